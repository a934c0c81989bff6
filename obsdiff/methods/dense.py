"""Dense: prunes nothing (the reference row of every comparison)."""

from __future__ import annotations

from dataclasses import dataclass

from obsdiff.methods.base import GroupJob, LayerRecord, PruningMethod
from obsdiff.pruning.patterns import Pattern


@dataclass
class Dense(PruningMethod):
    name = "dense"
    granularities = ("unstructured", "nm", "structured")

    def prune_groups(self, groups: list[GroupJob], pattern: Pattern) -> list[LayerRecord]:
        return [
            LayerRecord(name, tuple(module.weight.shape), 0)
            for group in groups
            for name, module in zip(group.names, group.modules, strict=True)
        ]
