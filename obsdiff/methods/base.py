"""The method contract: which statistics a method needs and how it prunes one package.

Every granularity goes through `prune_package(package, target)`, which cuts the package into
work units solved independently of each other (`work_units`) and prunes one after the other: for
a pattern target (unstructured, N:M) the method's `solve_units` of its input groups, each pruned
by `prune_groups`; for a `Structured` target its blocks, each pruned by the structured driver
(`obsdiff.methods.structured`) calling the method's `select_heads` / `select_neurons`. The
sharded solve (`obsdiff.calibration.solve`) deals the same units to the ranks, so a unit meets
the same arithmetic whichever process solves it. A unit's statistics are moved to its linears'
device just before its solve (offloaded statistics: one unit on the device at a time).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import fields
from typing import Any, ClassVar

import torch

from obsdiff.methods.granularity import GRANULARITY_OPTIONS
from obsdiff.methods.package import (
    InputGroup,
    LayerRecord,
    Package,
    PruneRecord,
    Structured,
    Target,
)
from obsdiff.methods.structured import prune_structured
from obsdiff.pruning.patterns import Pattern


class PruningMethod(ABC):
    """A pruning method; its YAML in conf/method/ names the subclass and its parameters."""

    name: ClassVar[str]
    granularities: ClassVar[tuple[str, ...]]  # kinds of obsdiff.methods.Granularity
    needs_hessian: ClassVar[bool] = False
    needs_moments: ClassVar[bool] = False

    @property
    def needs_calibration(self) -> bool:
        return self.needs_hessian or self.needs_moments

    def check_granularity(self, kind: str) -> None:
        if kind not in self.granularities:
            options = [o for k in self.granularities for o in GRANULARITY_OPTIONS[k]]
            raise ValueError(
                f"method {self.name!r} does not support {kind} pruning; with method="
                f"{self.name} use granularity={' or '.join(options)}"
            )

    def describe(self) -> dict[str, Any]:
        """The method's name and parameters (every method is a dataclass)."""
        params = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        return {"name": self.name, **params}

    def solve_units(self, shapes: list[tuple[int, int]]) -> list[list[int]]:
        """Which input groups (by their (inputs, stacked outputs)) are solved together, in
        order: each alone unless the method batches them."""
        return [[index] for index in range(len(shapes))]

    def work_units(self, package: Package, target: Target) -> list[Package]:
        """The parts of `package` pruned independently of each other, in order: its blocks
        (structured) or the method's `solve_units` of its input groups."""
        if isinstance(target, Structured):
            return [package.block_part(block) for block in package.blocks]
        units = self.solve_units([group.shape for group in package.groups])
        return [Package([package.groups[i] for i in unit]) for unit in units]

    def prune_unit(self, unit: Package, target: Target) -> list[PruneRecord]:
        """Prune one work unit in place (its statistics on its device)."""
        if isinstance(target, Structured):
            return list(prune_structured(self, unit, target.sparsity))
        return list(self.prune_groups(unit.groups, target))

    def prune_package(self, package: Package, target: Target) -> list[PruneRecord]:
        """Prune one calibrated package in place towards `target`, work unit by work unit;
        one record per linear (patterns) or per head and neuron group (structured), in the
        package's order."""
        records = []
        for unit in self.work_units(package, target):
            records += self.prune_unit(unit.local(), target)
        return package_order(package, records)

    @abstractmethod
    def prune_groups(self, groups: list[InputGroup], pattern: Pattern) -> list[LayerRecord]:
        """Prune every linear of `groups` in place (one package) and report what was done."""

    def select_heads(
        self,
        consumers: list[torch.Tensor],
        hessians: list[torch.Tensor | None],
        producers: list[torch.Tensor],
        head_dim: int,
        count: int,
    ) -> tuple[list[torch.Tensor], list[int]]:
        """Structured: which `count` heads go, and the consumers' new weights (columns of the
        heads' range, (rows, heads * head_dim) each). Producers are (heads * head_dim, in)."""
        raise ValueError(f"method {self.name!r} does not support structured pruning")

    def select_neurons(
        self,
        consumer: torch.Tensor,
        hessian: torch.Tensor | None,
        producers: list[torch.Tensor],
        count: int,
    ) -> tuple[torch.Tensor, list[int]]:
        """Structured: which `count` FFN neurons go, and the down-projection's new weight
        ((rows, width)). Producers are the (width, in) row blocks of the up-projection(s)."""
        raise ValueError(f"method {self.name!r} does not support structured pruning")


def package_order(package: Package, records: list[PruneRecord]) -> list[PruneRecord]:
    """Layer records in the order of the package's linears (work units may batch them in
    another); structured records keep their block order."""
    position = {name: i for i, name in enumerate(n for g in package.groups for n in g.names)}
    return sorted(records, key=lambda r: position.get(getattr(r, "name", ""), 0))
