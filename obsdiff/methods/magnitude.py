"""Magnitude: one |w| threshold per layer; needs no calibration."""

from __future__ import annotations

from dataclasses import dataclass

from obsdiff.methods.base import PruningMethod
from obsdiff.methods.package import InputGroup, LayerRecord, write_weight
from obsdiff.pruning.magnitude import magnitude_prune
from obsdiff.pruning.patterns import Pattern


@dataclass
class Magnitude(PruningMethod):
    name = "magnitude"
    granularities = ("unstructured", "nm")

    def prune_groups(self, groups: list[InputGroup], pattern: Pattern) -> list[LayerRecord]:
        records = []
        for group in groups:
            for name, module in zip(group.names, group.modules, strict=True):
                weight, mask = magnitude_prune(module.weight.data, pattern)
                write_weight(module, weight, mask)
                records.append(LayerRecord(name, tuple(module.weight.shape), int(mask.sum())))
        return records
