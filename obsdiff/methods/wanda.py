"""Wanda: |W| * ||X||, compared per output row, with timestep-weighted input norms."""

from __future__ import annotations

from dataclasses import dataclass

from obsdiff.methods.base import PruningMethod
from obsdiff.methods.package import InputGroup, LayerRecord, write_weight
from obsdiff.pruning.patterns import Pattern
from obsdiff.pruning.wanda import wanda_prune


@dataclass
class Wanda(PruningMethod):
    name = "wanda"
    granularities = ("unstructured", "nm")
    needs_moments = True

    def prune_groups(self, groups: list[InputGroup], pattern: Pattern) -> list[LayerRecord]:
        records = []
        for group in groups:
            assert group.stats is not None
            norms = group.stats.column_sq_norms()
            for name, module in zip(group.names, group.modules, strict=True):
                weight, mask = wanda_prune(module.weight.data, norms, pattern)
                write_weight(module, weight, mask)
                records.append(LayerRecord(name, tuple(module.weight.shape), int(mask.sum())))
        return records
