"""Diff-Pruning (Fang et al., NeurIPS 2023) as a baseline: weights ranked by their first-order
Taylor importance |w ⊙ ∂L/∂w| under the model's own training loss, summed over the informative
timesteps (`obsdiff.pruning.taylor`: the official threshold rule from the low-noise end).

Unstructured and N:M: each linear keeps the weights of the largest scores, one threshold per
layer (as magnitude, with the Taylor score in place of |w|); no compensation. The scores come
from one pass before the packages (`prune_pipeline` runs it: the dense model's gradients, as the
official code takes them), on one batch of the calibration prompts (`calibration.batch_size`,
the official code's one batch of clean images), the model's samples of them as clean latents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from obsdiff.methods.base import PruningMethod
from obsdiff.methods.package import InputGroup, LayerRecord, write_weight
from obsdiff.pruning.patterns import Pattern, mask_for
from obsdiff.pruning.taylor import (
    OFFICIAL_LEVELS,
    OFFICIAL_THRESHOLD,
    TaylorScores,
    check_threshold,
)


@dataclass
class DiffPruning(PruningMethod):
    """Diff-Pruning's Taylor importance.

    Attributes:
        threshold: The walk over the training levels stops after the first whose loss is below
            this share of the largest (the official 0.05); in (0, 1].
        levels: The training levels walked, from the low-noise end (the official 1000).
    """

    name = "diff_pruning"
    granularities = ("unstructured", "nm")
    needs_gradients: ClassVar[bool] = True

    threshold: float = OFFICIAL_THRESHOLD
    levels: int = field(default=OFFICIAL_LEVELS, metadata={"minimum": 1})

    def __post_init__(self) -> None:
        check_threshold(self.threshold)
        if self.levels < 1:
            raise ValueError(f"method.levels={self.levels} must be >= 1")
        self._scores: TaylorScores | None = None

    def use_scores(self, scores: TaylorScores) -> None:
        """The Taylor pass's scores, which `prune_groups` reads by layer name."""
        self._scores = scores

    def prune_groups(self, groups: list[InputGroup], pattern: Pattern) -> list[LayerRecord]:
        if self._scores is None:
            raise RuntimeError("diff_pruning: no Taylor scores; prune_pipeline computes them first")
        records = []
        for group in groups:
            for name, module in zip(group.names, group.modules, strict=True):
                scores = self._scores.weights[name].to(module.weight.device)
                mask = mask_for(scores, pattern, group="layer")
                write_weight(module, module.weight.data.masked_fill(mask, 0), mask)
                records.append(LayerRecord(name, tuple(module.weight.shape), int(mask.sum())))
        return records
