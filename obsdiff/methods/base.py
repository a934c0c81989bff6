"""The method contract: which statistics a method needs and how it prunes one package.

Every granularity goes through `prune_package(package, target)`: a pattern target (unstructured,
N:M) is `prune_groups` on the package's input groups; a `Structured` target is the structured
driver (`obsdiff.methods.structured`) calling the method's `select_heads` / `select_neurons`.
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

    def prune_package(self, package: Package, target: Target) -> list[PruneRecord]:
        """Prune one calibrated package in place towards `target`; one record per linear
        (patterns) or per head and neuron group (structured)."""
        if isinstance(target, Structured):
            return list(prune_structured(self, package, target.sparsity))
        return list(self.prune_groups(package.groups, target))

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
