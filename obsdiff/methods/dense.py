"""Dense: prunes nothing (the reference row of every comparison)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from obsdiff.methods.base import PruningMethod
from obsdiff.methods.package import InputGroup, LayerRecord
from obsdiff.pruning.patterns import Pattern


@dataclass
class Dense(PruningMethod):
    name = "dense"
    granularities = ("unstructured", "nm", "structured")

    def prune_groups(self, groups: list[InputGroup], pattern: Pattern) -> list[LayerRecord]:
        return [
            LayerRecord(name, tuple(module.weight.shape), 0)
            for group in groups
            for name, module in zip(group.names, group.modules, strict=True)
        ]

    def select_heads(
        self,
        consumers: list[torch.Tensor],
        hessians: list[torch.Tensor | None],
        producers: list[torch.Tensor],
        head_dim: int,
        count: int,
    ) -> tuple[list[torch.Tensor], list[int]]:
        return consumers, []

    def select_neurons(
        self,
        consumer: torch.Tensor,
        hessian: torch.Tensor | None,
        producers: list[torch.Tensor],
        count: int,
    ) -> tuple[torch.Tensor, list[int]]:
        return consumer, []
