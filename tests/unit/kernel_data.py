"""Data for the kernel tests: activations with correlated outlier channels, the layer objective."""

from __future__ import annotations

import torch


def outlier_inputs(
    tokens: int, features: int, seed: int, dtype: torch.dtype = torch.float64, mean: float = 0.0
) -> torch.Tensor:
    """(tokens, features) activations: correlated channels, a few with 10-30x outliers."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=g, dtype=dtype) / features**0.5
    x = torch.randn(tokens, features, generator=g, dtype=dtype) @ (
        torch.eye(features, dtype=dtype) + mixing
    )
    outliers = torch.randperm(features, generator=g)[: max(1, features // 16)]
    x[:, outliers] *= 10 + 20 * torch.rand(len(outliers), generator=g, dtype=dtype)
    return x + mean


def output_error(W: torch.Tensor, W_pruned: torch.Tensor, X: torch.Tensor) -> float:
    """||(W - W') X^T||^2: the layer-wise objective (Eq. 1)."""
    return float(((W - W_pruned) @ X.T).square().sum())
