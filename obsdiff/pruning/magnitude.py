"""Magnitude pruning, as the official Wanda / SparseGPT baselines do it.

Unstructured: one threshold per layer over the whole matrix (not per row, not global across
layers); N:M: the N smallest |w| of every M consecutive input weights of each row. Selection is by
sorted index, so exactly floor(numel * sparsity) weights go even with ties (the official `<=`
threshold over-prunes when a matrix already holds exact zeros: a deliberate difference).
"""

from __future__ import annotations

import torch

from obsdiff.pruning.patterns import Pattern, mask_for


def magnitude_mask(weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """True where a weight (rows, columns) is pruned."""
    return mask_for(weight.abs(), pattern, group="layer")


def magnitude_prune(weight: torch.Tensor, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight, mask)."""
    mask = magnitude_mask(weight, pattern)
    return weight.masked_fill(mask, 0), mask
