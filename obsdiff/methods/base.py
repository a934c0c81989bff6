"""The method contract: which statistics a method needs and how it prunes, nothing more.

A method is a dataclass of its parameters that answers:
- which calibration statistics it reads (`needs_hessian`, `needs_moments`; neither: no
  calibration pass), or whether it reads the training loss's gradients instead
  (`needs_gradients`: one Taylor pass before the packages, `obsdiff.pruning.taylor`);
- at a pattern granularity (unstructured, N:M), how one linear is pruned given the statistics of
  the input it reads (`prune_linear`); a method that solves several input groups at once
  overrides `prune_groups` and says which groups go together (`solve_units`);
- at structured granularity, which heads and FFN neurons go and how their consumers change
  (`select_heads`, `select_neurons`).

The loop over a package's work units, in one process or shared between ranks, and the cutting
of structured blocks are the package driver's (`obsdiff.calibration.solve`).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, ClassVar

import torch

from obsdiff.methods.granularity import GRANULARITY_OPTIONS
from obsdiff.methods.package import InputGroup, LayerRecord, UnitGroup, write_weight
from obsdiff.models.base import ModelAdapter
from obsdiff.pruning.l1 import l1_select
from obsdiff.pruning.obs import obs_workspace_bytes
from obsdiff.pruning.patterns import Pattern
from obsdiff.pruning.statistics import InputStatistics


FLOAT32 = 4


class PruningMethod:
    """A pruning method; its YAML in conf/method/ names the subclass (a dataclass)."""

    name: ClassVar[str]
    granularities: ClassVar[tuple[str, ...]]  # kinds of obsdiff.methods.Granularity
    needs_hessian: ClassVar[bool] = False
    needs_moments: ClassVar[bool] = False
    needs_gradients: ClassVar[bool] = False  # Taylor scores from the training loss (Diff-Pruning)

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

    # ------------------------------------------------------------ patterns
    def prune_linear(
        self,
        weight: torch.Tensor,
        stats: InputStatistics | None,
        pattern: Pattern,
        ffn: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One linear's pruned weight and mask (True where pruned), both (rows, inputs), from
        its weight and the statistics of its input (None without calibration); `ffn`: it
        belongs to a feed-forward network."""
        raise ValueError(f"method {self.name!r} does not prune by weight patterns")

    def prune_groups(self, groups: list[InputGroup], pattern: Pattern) -> list[LayerRecord]:
        """Prune every linear of `groups` in place and report what was done: by default one
        `prune_linear` at a time."""
        records = []
        for group in groups:
            for index, (name, module) in enumerate(zip(group.names, group.modules, strict=True)):
                weight, mask = self.prune_linear(
                    module.weight.data, group.stats, pattern, group.is_ffn(index)
                )
                write_weight(module, weight, mask)
                records.append(LayerRecord(name, tuple(module.weight.shape), int(mask.sum())))
        return records

    def solve_units(self, shapes: list[tuple[int, int]]) -> list[list[int]]:
        """Which input groups (by their (inputs, stacked outputs)) `prune_groups` is given
        together, in order: each alone unless the method batches them."""
        return [[index] for index in range(len(shapes))]

    def solve_bytes(self, inputs: int, rows: int) -> int:
        """Working memory of pruning one input group of `inputs` columns and `rows` stacked
        outputs: the OBS workspace for a method that reads the Hessian, else the weights
        copied, scored and updated in float32."""
        if self.needs_hessian:
            return obs_workspace_bytes(inputs, rows)
        return FLOAT32 * 3 * rows * inputs

    def check_model(self, model: ModelAdapter) -> None:
        """ValueError if the method cannot prune this model's family as configured (checked
        before any weight loads): a method that reads what only some families offer."""

    def scoring_bytes(self, shapes: list[tuple[int, int]], structured: bool) -> int:
        """Memory of the method's own pass before the packages (a gradient method's scores),
        over the (out, in) shapes of the linears it scores; 0 for a method without one."""
        return 0

    # ---------------------------------------------------------- structured
    def check_counts(self, removed: int, units: int) -> None:
        """Structured: ValueError if the method cannot remove `removed` of the `units` heads
        and neurons of the groups a job prunes (checked before any weight loads)."""

    def select_heads(
        self,
        consumers: list[torch.Tensor],
        hessians: list[torch.Tensor | None],
        producers: list[torch.Tensor],
        head_dim: int,
        count: int,
        where: UnitGroup,
    ) -> tuple[list[torch.Tensor], list[int]]:
        """Structured: which `count` heads go, and the consumers' new weights (columns of the
        heads' range, (rows, heads * head_dim) each). Producers are (heads * head_dim, in);
        `where` names the group and its linears (for scores kept by name)."""
        raise ValueError(f"method {self.name!r} does not support structured pruning")

    def select_neurons(
        self,
        consumer: torch.Tensor,
        hessian: torch.Tensor | None,
        producers: list[torch.Tensor],
        count: int,
        where: UnitGroup,
    ) -> tuple[torch.Tensor, list[int]]:
        """Structured: which `count` FFN neurons go, and the down-projection's new weight
        ((rows, width)). Producers are the (width, in) row blocks of the up-projection(s);
        `where` names the group and its linears."""
        raise ValueError(f"method {self.name!r} does not support structured pruning")


class ScoredUnits(PruningMethod):
    """A structured method that scored or learnt its units before the packages (Diff-Pruning's
    Taylor sums, EcoDiff's gate logits): each group drops its `count` lowest-scoring units,
    ties by index, and no weight is compensated."""

    def unit_scores(self, where: UnitGroup) -> torch.Tensor:
        """Each unit's score of the group (units,), higher is kept."""
        raise NotImplementedError

    def select_heads(
        self,
        consumers: list[torch.Tensor],
        hessians: list[torch.Tensor | None],
        producers: list[torch.Tensor],
        head_dim: int,
        count: int,
        where: UnitGroup,
    ) -> tuple[list[torch.Tensor], list[int]]:
        return consumers, l1_select(self.unit_scores(where), count).tolist()

    def select_neurons(
        self,
        consumer: torch.Tensor,
        hessian: torch.Tensor | None,
        producers: list[torch.Tensor],
        count: int,
        where: UnitGroup,
    ) -> tuple[torch.Tensor, list[int]]:
        return consumer, l1_select(self.unit_scores(where), count).tolist()
