"""Low-rank modulation: the AdaLN modulation linears (a third of every MMDiT, which the pruning
methods never touch) replaced by two linears of low rank, chosen from the same timestep-weighted
calibration statistics as the package's (`obsdiff.pruning.low_rank`: the optimal factors of the
weighted output error).

A modulation linear reads only the conditioning vector (the timestep embedding, plus the pooled
text for SD3 and Flux, plus guidance for Flux-dev): one vector per sample and step, which spans
few directions, so a small rank keeps almost all of its weighted output energy. The rank of each
linear is `rank`, or the smallest that keeps `energy` of its weighted output energy, or the one
that keeps `budget` of its parameters; a rank that would not make the linear smaller leaves it
as it is (recorded at its full rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from obsdiff.methods.package import LowRankRecord
from obsdiff.models.structure import check_rank_fits, linear_at
from obsdiff.models.surgery import factorised_linear, replace_submodule
from obsdiff.pruning.low_rank import energy_rank, kept_energy, low_rank_factors, output_spectrum
from obsdiff.pruning.statistics import InputStatistics


@dataclass(frozen=True)
class LowRankModulation:
    """How each modulation linear's rank is chosen (the `modulation=low_rank` option): exactly
    one of the three.

    Attributes:
        rank: The same rank r for every modulation linear (at most min(out, in)).
        energy: The smallest rank that keeps this share of each linear's weighted output energy,
            in (0, 1] (e.g. 0.999).
        budget: The rank that keeps this share of each linear's parameters, in (0, 1):
            floor(budget x out x in / (out + in)), at least 1.
    """

    rank: int | None = None
    energy: float | None = None
    budget: float | None = None

    def __post_init__(self) -> None:
        chosen = [k for k in ("rank", "energy", "budget") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError(
                "modulation=low_rank needs exactly one of modulation.rank, modulation.energy and "
                f"modulation.budget (given: {', '.join(chosen) or 'none'}); e.g. "
                "modulation.rank=8 or modulation.energy=0.999"
            )
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"modulation.rank={self.rank} must be >= 1; e.g. modulation.rank=8")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError(
                f"modulation.energy={self.energy} must be in (0, 1]; e.g. modulation.energy=0.999"
            )
        if self.budget is not None and not 0 < self.budget < 1:
            raise ValueError(
                f"modulation.budget={self.budget} must be in (0, 1); e.g. modulation.budget=0.1"
            )

    def describe(self) -> dict[str, Any]:
        chosen = {k: getattr(self, k) for k in ("rank", "energy", "budget")}
        return {"name": "low_rank", **{k: v for k, v in chosen.items() if v is not None}}

    def check_widths(self, denoiser: nn.Module, names: list[str]) -> None:
        """A fixed rank fits every modulation linear (at most min(out, in)); else ValueError
        naming the narrowest and the largest rank that fits."""
        if self.rank is not None:
            check_rank_fits(denoiser, names, self.rank, "modulation.rank")

    def choose_rank(self, singular_values: torch.Tensor, shape: tuple[int, int]) -> int:
        """The rank of one linear of `shape` (out, in) whose weighted outputs have these
        singular values."""
        out_features, in_features = shape
        if self.rank is not None:
            return self.rank
        if self.energy is not None:
            return energy_rank(singular_values, self.energy)
        assert self.budget is not None
        return max(1, int(self.budget * out_features * in_features / (out_features + in_features)))


def modulation_statistics(
    denoiser: nn.Module, names: list[str], device: torch.device | str | None = None
) -> list[tuple[nn.Linear, InputStatistics]]:
    """One input's weighted second moment per modulation linear (fed by the calibration hooks
    with the step weights of the package's statistics)."""
    linears = [linear_at(denoiser, name) for name in names]
    return [
        (linear, InputStatistics(linear.in_features, hessian=True, moments=False, device=device))
        for linear in linears
    ]


def compress_modulation(
    denoiser: nn.Module,
    names: list[str],
    statistics: list[InputStatistics],
    settings: LowRankModulation,
) -> list[LowRankRecord]:
    """Each named linear replaced, in place, by its optimal low-rank factors under its
    statistics; a linear whose rank would not make it smaller is kept (and recorded at full
    rank)."""
    records = []
    for name, stats in zip(names, statistics, strict=True):
        linear = linear_at(denoiser, name)
        shape = (linear.out_features, linear.in_features)
        directions, singular_values = output_spectrum(linear.weight, stats.hessian_matrix())
        rank = min(settings.choose_rank(singular_values, shape), min(shape))
        if rank * (shape[0] + shape[1]) >= shape[0] * shape[1]:  # no smaller: left whole
            records.append(LowRankRecord(name, shape, min(shape), 1.0))
            continue
        up, down = low_rank_factors(linear.weight, directions, rank)
        replace_submodule(denoiser, name, factorised_linear(linear, up, down))
        records.append(LowRankRecord(name, shape, rank, kept_energy(singular_values, rank)))
    return records
