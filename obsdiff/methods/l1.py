"""L1-norm structured baseline (Li et al., 2017): drop the heads and neurons whose producing
weights have the smallest summed |W|; no calibration, no compensation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from obsdiff.methods.base import PruningMethod
from obsdiff.methods.package import UnitGroup
from obsdiff.pruning.l1 import l1_select, l1_unit_scores


@dataclass
class L1(PruningMethod):
    name = "l1"
    granularities = ("structured",)

    def select_heads(
        self,
        consumers: list[torch.Tensor],
        hessians: list[torch.Tensor | None],
        producers: list[torch.Tensor],
        head_dim: int,
        count: int,
        where: UnitGroup,
    ) -> tuple[list[torch.Tensor], list[int]]:
        removed = l1_select(l1_unit_scores(producers, unit_size=head_dim), count)
        return consumers, removed.tolist()

    def select_neurons(
        self,
        consumer: torch.Tensor,
        hessian: torch.Tensor | None,
        producers: list[torch.Tensor],
        count: int,
        where: UnitGroup,
    ) -> tuple[torch.Tensor, list[int]]:
        return consumer, l1_select(l1_unit_scores(producers), count).tolist()
