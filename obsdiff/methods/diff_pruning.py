"""Diff-Pruning (Fang et al., NeurIPS 2023) as a baseline: weights ranked by their first-order
Taylor importance |w ⊙ ∂L/∂w| under the model's own training loss, summed over the informative
timesteps (`obsdiff.pruning.taylor`: the official threshold rule from the low-noise end).

Unstructured and N:M: each linear keeps the weights of the largest scores, one threshold per
layer (as magnitude, with the Taylor score in place of |w|); no compensation. Structured: a
head's or FFN neuron's score is the sum of its weights' scores, its rows of the producers (q/k/v,
the up-projections) and its columns of the consumers (output and down projections), as the
official code's Torch-Pruning `TaylorImportance` sums a channel's coupled weights (its mean over
the coupled layers and its normalisation rank the units of a group the same; the biases it
also scores are left out here); each group drops its lowest-scoring units, no compensation.

The scores come from one pass before the packages (`prune_pipeline` runs it: the dense model's
gradients, as the official code takes them), on one batch of the calibration prompts
(`calibration.batch_size`, the official code's one batch of clean images), the model's samples
of them as clean latents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from obsdiff.methods.base import ScoredUnits
from obsdiff.methods.package import InputGroup, LayerRecord, UnitGroup, write_weight
from obsdiff.models.base import ModelAdapter
from obsdiff.prompts.image_folder import read_image_folder
from obsdiff.pruning.patterns import Pattern, mask_for
from obsdiff.pruning.taylor import (
    OFFICIAL_LEVELS,
    OFFICIAL_THRESHOLD,
    TaylorScores,
    check_threshold,
)


@dataclass
class DiffPruning(ScoredUnits):
    """Diff-Pruning's Taylor importance.

    Attributes:
        threshold: The walk over the training levels stops after the first whose loss is below
            this share of the largest (the official 0.05); in (0, 1].
        levels: The training levels walked, from the low-noise end (the official 1000).
        images: An image-text folder (`obsdiff.prompts.image_folder`): its first
            `calibration.batch_size` images, encoded by the VAE, are the clean latents and
            their captions the conditioning (the official code's one batch of real images).
            Null: the dense model's own samples of the calibration prompts (data-free).
    """

    name = "diff_pruning"
    granularities = ("unstructured", "nm", "structured")
    needs_gradients: ClassVar[bool] = True

    threshold: float = OFFICIAL_THRESHOLD
    levels: int = field(default=OFFICIAL_LEVELS, metadata={"minimum": 1})
    images: str | None = None

    def __post_init__(self) -> None:
        check_threshold(self.threshold)
        if self.levels < 1:
            raise ValueError(f"method.levels={self.levels} must be >= 1")
        if self.images is not None:
            read_image_folder(self.images, "method.images")  # readable, every image captioned
        self._scores: TaylorScores | None = None

    def check_model(self, model: ModelAdapter) -> None:
        if self.images is not None and model.video:
            raise ValueError(
                f"method.images={self.images}: model={model.name} makes videos, whose clean "
                "latents an image folder cannot give; leave method.images unset (the model's "
                "own videos of the calibration prompts)"
            )

    def scoring_bytes(self, shapes: list[tuple[int, int]], structured: bool) -> int:
        """The Taylor pass's scores (float32: per row and column, and per weight unless
        structured) plus the largest linear's gradient and its score in float32 (the hook's);
        the backward's activations are not counted."""
        kept = sum(out + inp + (0 if structured else out * inp) for out, inp in shapes)
        largest = max((out * inp for out, inp in shapes), default=0)
        return 4 * kept + 2 * 4 * largest

    def use_scores(self, scores: TaylorScores) -> None:
        """The Taylor pass's scores, which `prune_groups` reads by layer name."""
        self._scores = scores

    @property
    def scores(self) -> TaylorScores:
        if self._scores is None:
            raise RuntimeError("diff_pruning: no Taylor scores; prune_pipeline computes them first")
        return self._scores

    def unit_scores(self, where: UnitGroup) -> torch.Tensor:
        """Each unit's score: its producer rows' and consumer columns' sums. (units,)"""
        total = torch.zeros(where.units, dtype=torch.float64)
        for lines, places in (
            (self.scores.rows, where.producers),
            (self.scores.columns, where.consumers),
        ):
            for name, offset in places:
                part = lines[name][offset : offset + where.width].double().cpu()  # (width,)
                total += part.reshape(where.units, where.unit_width).sum(1)
        return total

    def prune_groups(self, groups: list[InputGroup], pattern: Pattern) -> list[LayerRecord]:
        records = []
        for group in groups:
            for name, module in zip(group.names, group.modules, strict=True):
                scores = self.scores.weights[name].to(module.weight.device)
                mask = mask_for(scores, pattern, group="layer")
                write_weight(module, module.weight.data.masked_fill(mask, 0), mask)
                records.append(LayerRecord(name, tuple(module.weight.shape), int(mask.sum())))
        return records
