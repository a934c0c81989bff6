"""L1-norm structured baseline (Li et al., 2017): remove the units with the smallest weights.

A unit is an FFN neuron or an attention head. Its score is the sum of |W| over the weights that
produce it: the rows of the up-projection(s) for a neuron (both halves of a GEGLU projection),
the head's rows of q/k/v (and add_q/k/v for joint attention) for a head. `dim=1` scores the
consuming columns instead (down-projection, output projection). No weight is compensated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def l1_unit_scores(
    matrices: Sequence[torch.Tensor], unit_size: int = 1, dim: int = 0
) -> torch.Tensor:
    """Sum of |W| per unit of `unit_size` consecutive rows (dim=0) or columns (dim=1). (units,)"""
    if not matrices:
        raise ValueError("l1_unit_scores needs at least one matrix")
    if dim not in (0, 1):
        raise ValueError(f"dim={dim}: use 0 (producer rows) or 1 (consumer columns)")
    scores = None
    for W in matrices:
        per_line = W.abs().to(torch.float64).sum(1 - dim)  # (lines,)
        if per_line.numel() % unit_size:
            raise ValueError(f"{per_line.numel()} lines are not whole units of size {unit_size}")
        per_unit = per_line.reshape(-1, unit_size).sum(1)  # (units,)
        if scores is not None and per_unit.shape != scores.shape:
            raise ValueError("all matrices must hold the same number of units")
        scores = per_unit if scores is None else scores + per_unit
    assert scores is not None
    return scores


def l1_select(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted indices of the `count` units with the smallest score (ties by index): L1's, and
    any other method's that drops its lowest-scoring units."""
    if not 0 <= count < scores.numel():
        raise ValueError(f"cannot remove {count} of {scores.numel()} units")
    return torch.sort(torch.sort(scores, stable=True).indices[:count]).values
