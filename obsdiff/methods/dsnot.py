"""DSnoT on top of Wanda (or magnitude / OBS saliency) masks, with timestep-weighted statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from obsdiff.methods.base import PruningMethod
from obsdiff.pruning.dsnot import INITIAL_METHODS, dsnot_prune
from obsdiff.pruning.patterns import Pattern
from obsdiff.pruning.statistics import InputStatistics


@dataclass
class DSnoT(PruningMethod):
    """DSnoT's prune-and-grow cycles, with the official defaults (`obsdiff.pruning.dsnot`).

    Attributes:
        max_cycles: Swap cycles per row; 0 keeps the initial mask.
        update_threshold: A row stops once its summed output shift is below this.
        reference_tokens: Null: the official absolute threshold; e.g. 2048: the threshold
            scaled by tokens per sample / 2048.
        var_power: The exponent of the input variance in the growth criterion.
        initial: The mask it starts from: wanda, magnitude or obs.
        skip_mlp: True: the official `--skip_layer mlp` (FFN layers keep their initial mask);
            obsdiff's default refines every layer.
    """

    max_cycles: int = 50
    update_threshold: float = 0.1
    reference_tokens: float | None = None
    var_power: float = 1.0
    initial: str = "wanda"
    skip_mlp: bool = False

    name = "dsnot"
    granularities = ("unstructured", "nm")
    needs_moments = True

    def __post_init__(self) -> None:
        if self.initial not in INITIAL_METHODS:
            raise ValueError(
                f"method.initial={self.initial!r}; use one of {', '.join(INITIAL_METHODS)}"
            )

    @property
    def needs_hessian(self) -> bool:  # type: ignore[override]
        return self.initial == "obs"

    def prune_linear(
        self, weight: torch.Tensor, stats: InputStatistics | None, pattern: Pattern, ffn: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert stats is not None
        return dsnot_prune(
            weight,
            stats,
            pattern,
            initial=self.initial,
            max_cycles=0 if self.skip_mlp and ffn else self.max_cycles,
            update_threshold=self.update_threshold,
            reference_tokens=self.reference_tokens,
            var_power=self.var_power,
        )
