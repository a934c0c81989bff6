"""Dense: prunes nothing (the reference row of every comparison)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from obsdiff.methods.base import PruningMethod
from obsdiff.methods.package import UnitGroup
from obsdiff.pruning.patterns import Pattern
from obsdiff.pruning.statistics import InputStatistics


@dataclass
class Dense(PruningMethod):
    name = "dense"
    granularities = ("unstructured", "nm", "structured")

    def prune_linear(
        self, weight: torch.Tensor, stats: InputStatistics | None, pattern: Pattern, ffn: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return weight, torch.zeros_like(weight, dtype=torch.bool)

    def select_heads(
        self,
        consumers: list[torch.Tensor],
        hessians: list[torch.Tensor | None],
        producers: list[torch.Tensor],
        head_dim: int,
        count: int,
        where: UnitGroup,
    ) -> tuple[list[torch.Tensor], list[int]]:
        return consumers, []

    def select_neurons(
        self,
        consumer: torch.Tensor,
        hessian: torch.Tensor | None,
        producers: list[torch.Tensor],
        count: int,
        where: UnitGroup,
    ) -> tuple[torch.Tensor, list[int]]:
        return consumer, []
