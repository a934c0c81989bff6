"""Wanda (Sun et al., 2024): score |W_ij| * ||X_j||_2, compared within each output row.

As `locuslab/wanda`: the squared input norms are a (here timestep-weighted) mean over calibration
samples of the per-column squared norm over tokens (`InputStatistics.column_sq_norms`); each row
loses exactly floor(in_features * sparsity) weights (stable sort, so ties go by index); N:M drops
the N lowest scores of every group of M consecutive input columns.
"""

from __future__ import annotations

import torch

from obsdiff.pruning.patterns import Pattern, mask_for


def wanda_scores(weight: torch.Tensor, column_sq_norms: torch.Tensor) -> torch.Tensor:
    """|W| * sqrt(||X_j||^2), broadcast over rows. weight (rows, n), norms (n,) -> (rows, n)."""
    if column_sq_norms.shape != (weight.shape[1],):
        raise ValueError(
            f"input norms of shape {tuple(column_sq_norms.shape)} do not match weight "
            f"{tuple(weight.shape)}"
        )
    norms = column_sq_norms.to(device=weight.device, dtype=torch.float32)
    return weight.abs().to(torch.float32) * norms.sqrt().unsqueeze(0)


def wanda_mask(
    weight: torch.Tensor, column_sq_norms: torch.Tensor, pattern: Pattern
) -> torch.Tensor:
    """True where a weight is pruned: per row (unstructured) or per M-group (N:M)."""
    return mask_for(wanda_scores(weight, column_sq_norms), pattern, group="row")


def wanda_prune(
    weight: torch.Tensor, column_sq_norms: torch.Tensor, pattern: Pattern
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight, mask)."""
    mask = wanda_mask(weight, column_sq_norms, pattern)
    return weight.masked_fill(mask, 0), mask
