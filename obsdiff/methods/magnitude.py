"""Magnitude: one |w| threshold per layer; needs no calibration."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from obsdiff.methods.base import PruningMethod
from obsdiff.pruning.magnitude import magnitude_prune
from obsdiff.pruning.patterns import Pattern
from obsdiff.pruning.statistics import InputStatistics


@dataclass
class Magnitude(PruningMethod):
    name = "magnitude"
    granularities = ("unstructured", "nm")

    def prune_linear(
        self, weight: torch.Tensor, stats: InputStatistics | None, pattern: Pattern, ffn: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return magnitude_prune(weight, pattern)
