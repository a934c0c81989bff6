"""DSnoT on top of Wanda (or magnitude / OBS saliency) masks, with timestep-weighted statistics."""

from __future__ import annotations

from dataclasses import dataclass

from obsdiff.methods.base import PruningMethod
from obsdiff.methods.package import InputGroup, LayerRecord, write_weight
from obsdiff.pruning.dsnot import INITIAL_METHODS, dsnot_prune
from obsdiff.pruning.patterns import Pattern


@dataclass
class DSnoT(PruningMethod):
    """`skip_mlp=True` is the official default (`--skip_layer mlp`): FFN layers keep their
    initial mask. obsdiff's default refines every layer."""

    max_cycles: int = 50
    update_threshold: float = 0.1
    reference_tokens: float | None = None  # official: an absolute threshold
    var_power: float = 1.0
    initial: str = "wanda"
    skip_mlp: bool = False

    name = "dsnot"
    granularities = ("unstructured", "nm")
    needs_moments = True

    def __post_init__(self) -> None:
        if self.initial not in INITIAL_METHODS:
            raise ValueError(f"dsnot initial={self.initial!r}; use one of {INITIAL_METHODS}")

    @property
    def needs_hessian(self) -> bool:  # type: ignore[override]
        return self.initial == "obs"

    def prune_groups(self, groups: list[InputGroup], pattern: Pattern) -> list[LayerRecord]:
        records = []
        for group in groups:
            assert group.stats is not None
            for index, (name, module) in enumerate(zip(group.names, group.modules, strict=True)):
                cycles = 0 if self.skip_mlp and group.is_ffn(index) else self.max_cycles
                weight, mask = dsnot_prune(
                    module.weight.data,
                    group.stats,
                    pattern,
                    initial=self.initial,
                    max_cycles=cycles,
                    update_threshold=self.update_threshold,
                    reference_tokens=self.reference_tokens,
                    var_power=self.var_power,
                )
                write_weight(module, weight, mask)
                records.append(LayerRecord(name, tuple(module.weight.shape), int(mask.sum())))
        return records
