"""Wanda: |W| * ||X||, compared per output row, with timestep-weighted input norms."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from obsdiff.methods.base import PruningMethod
from obsdiff.pruning.patterns import Pattern
from obsdiff.pruning.statistics import InputStatistics
from obsdiff.pruning.wanda import wanda_prune


@dataclass
class Wanda(PruningMethod):
    name = "wanda"
    granularities = ("unstructured", "nm")
    needs_moments = True

    def prune_linear(
        self, weight: torch.Tensor, stats: InputStatistics | None, pattern: Pattern, ffn: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert stats is not None
        return wanda_prune(weight, stats.column_sq_norms(), pattern)
