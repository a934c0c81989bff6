"""Sparsity patterns and exact mask selection shared by every method.

Masks are boolean tensors shaped like the weight, True where a weight is pruned. Counts are exact:
selection goes by sorted index, never by a `<=` threshold, so ties never over-prune.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def check_sparsity(sparsity: float) -> None:
    """One rule for every sparsity a user gives: a fraction in [0, 1)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must lie in [0, 1)")


@dataclass(frozen=True)
class Unstructured:
    """Prune `sparsity` of the weights of each layer (method-specific comparison group)."""

    sparsity: float

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)


@dataclass(frozen=True)
class NM:
    """N:M semi-structured: prune `n` of every `m` consecutive input weights of each row."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (0 < self.n < self.m):
            raise ValueError(f"N:M pattern {self.n}:{self.m} needs 0 < N < M (e.g. 2:4, 4:8)")

    @property
    def sparsity(self) -> float:
        return self.n / self.m

    def check_columns(self, columns: int) -> None:
        if columns % self.m:
            raise ValueError(
                f"{self.n}:{self.m} sparsity needs in_features divisible by {self.m}, got {columns}"
            )


Pattern = Unstructured | NM


def num_to_prune(total: int, sparsity: float) -> int:
    """floor(total * sparsity), robust to float round-off (0.29 * 100 -> 29, not 28)."""
    return math.floor(total * sparsity + 1e-6)


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at the k lowest scores of each row (last dim); ties go to the lower index.

    The same mask as taking the first k of a stable sort, from a selection (kthvalue) instead of
    a full sort: exact counts at a fraction of the cost on large blocks.
    """
    width = scores.shape[-1]
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= width:
        return torch.ones_like(scores, dtype=torch.bool)
    kth = torch.kthvalue(scores, k, dim=-1, keepdim=True).values  # (..., 1)
    below = scores < kth
    ties = scores == kth
    missing = k - below.sum(-1, keepdim=True)  # ties to take, lowest index first
    return below | (ties & (torch.cumsum(ties, dim=-1) <= missing))


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True at the num_to_prune(numel, sparsity) lowest scores of the whole tensor."""
    flat = lowest_k_mask(scores.reshape(1, -1), num_to_prune(scores.numel(), sparsity))
    return flat.reshape(scores.shape)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row (Wanda's comparison group): the same exact count in every row."""
    return lowest_k_mask(scores, num_to_prune(scores.shape[-1], sparsity))


def nm_mask(scores: torch.Tensor, pattern: NM) -> torch.Tensor:
    """True at the N lowest scores of every group of M consecutive columns of each row."""
    rows, columns = scores.shape[-2], scores.shape[-1]
    pattern.check_columns(columns)
    grouped = scores.reshape(*scores.shape[:-2], rows, columns // pattern.m, pattern.m)
    return lowest_k_mask(grouped, pattern.n).reshape(scores.shape)


def mask_for(scores: torch.Tensor, pattern: Pattern, group: str = "layer") -> torch.Tensor:
    """Mask of `pattern` from `scores` (lower = pruned first); `group` is 'layer' or 'row'."""
    if isinstance(pattern, NM):
        return nm_mask(scores, pattern)
    if group == "layer":
        return layer_mask(scores, pattern.sparsity)
    if group == "row":
        return row_mask(scores, pattern.sparsity)
    raise ValueError(f"unknown comparison group {group!r}; use 'layer' or 'row'")
