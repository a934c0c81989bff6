"""`calibration.max_tokens`: a seeded sample of a call's token positions, the same for each sample
of the call, whose scaled sums estimate the full call's without bias."""

from __future__ import annotations

import pytest
import torch

from obsdiff.calibration.hooks import token_sample
from obsdiff.pruning import InputStatistics


pytestmark = pytest.mark.unit


def test_a_call_keeps_at_most_the_cap_at_the_same_positions_for_each_sample() -> None:
    x = torch.arange(2 * 50 * 3, dtype=torch.float64).reshape(2, 50, 3)  # (B, T, n)
    kept, scale = token_sample(x, max_tokens=20, seed=0, call=7)
    assert kept.shape == (2, 10, 3)  # 20 tokens a call: 10 of each sample's 50
    positions = kept[0, :, 0] // 3  # row index of each kept token
    assert torch.equal(kept[1, :, 0] // 3 - 50, positions)  # the same positions in sample 1
    assert scale == 50 / 10
    again, _ = token_sample(x, max_tokens=20, seed=0, call=7)
    other, _ = token_sample(x, max_tokens=20, seed=0, call=8)
    assert torch.equal(again, kept) and not torch.equal(other, kept)


def test_within_the_cap_or_one_token_a_sample_nothing_changes() -> None:
    x = torch.randn(2, 8, 3)
    assert token_sample(x, 16, 0, 0) == (x, 1.0)
    pooled = torch.randn(4, 3)  # (B, n): a modulation's input, one row a sample
    assert token_sample(pooled, 1, 0, 0) == (pooled, 1.0)


def test_the_capped_statistics_estimate_the_full_ones_without_bias() -> None:
    """Over many calls of the same input, the capped Hessian and Wanda's column norms (fed with
    their token scale) converge to the full call's; the sample counts stay the calls'. Within
    2% after 2000 calls here."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 4, generator=generator, dtype=torch.float64).float()
    full, capped = InputStatistics(4), InputStatistics(4)
    calls = 2000
    for call in range(calls):
        full.update(x, 1.0)
        kept, scale = token_sample(x, max_tokens=16, seed=3, call=call)
        capped.update(kept, 1.0, token_scale=scale)
    assert capped.num_samples == full.num_samples == 2 * calls

    def close(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))

    assert close(capped.hessian_matrix(), full.hessian_matrix()) < 0.02
    assert close(capped.column_sq_norms(), full.column_sq_norms()) < 0.02
    assert close(capped.column_variance(), full.column_variance()) < 0.02
