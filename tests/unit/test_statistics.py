"""Timestep-weighted calibration statistics: closed form, batch-split invariance, exact merging."""

from __future__ import annotations

import pytest
import torch

from obsdiff.pruning import InputStatistics, Unstructured, obs_prune


pytestmark = pytest.mark.unit


def batches(seed: int = 0) -> list[tuple[torch.Tensor, float]]:
    """Five (B, L, n) batches with different sample and token counts and step weights."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 7), (4, 7), (1, 3), (3, 5), (2, 9)]
    weights = [1.2, 1.1, 1.0, 0.9, 0.8]
    return [
        (torch.randn(b, t, 6, generator=g) + 0.5, w)
        for (b, t), w in zip(shapes, weights, strict=True)
    ]


def closed_form(data: list[tuple[torch.Tensor, float]]) -> dict[str, torch.Tensor]:
    """Eq. 5 and the column moments written out in float64."""
    xtx = sum(w * x.reshape(-1, 6).double().T @ x.reshape(-1, 6).double() for x, w in data)
    per_sample = sum(w * x.shape[0] for x, w in data)
    per_token = sum(w * x.shape[0] * x.shape[1] for x, w in data)
    col_sum = sum(w * x.reshape(-1, 6).double().sum(0) for x, w in data)
    var = sum(  # DSnoT's: each sample's variance over its tokens, weighted by alpha * tokens
        w * x.shape[1] * x.double().var(1, correction=0).sum(0) for x, w in data
    )
    return {
        "H_sample": 2 * xtx / per_sample,
        "H_token": 2 * xtx / per_token,
        "sq_norms": torch.diagonal(xtx) / per_sample,
        "sum_per_sample": col_sum / per_sample,
        "mean": col_sum / per_token,
        "variance": var / per_token,
    }


def accumulate(data: list[tuple[torch.Tensor, float]]) -> InputStatistics:
    stats = InputStatistics(6)
    for x, w in data:
        stats.update(x, w)
    return stats


def test_matches_the_closed_form() -> None:
    data = batches()
    stats = accumulate(data)
    expected = closed_form(data)
    check = lambda a, b: torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)  # noqa: E731
    check(stats.hessian_matrix("sample"), expected["H_sample"])
    check(stats.hessian_matrix("token"), expected["H_token"])
    check(stats.column_sq_norms(), expected["sq_norms"])
    check(stats.column_sum_per_sample(), expected["sum_per_sample"])
    check(stats.column_mean(), expected["mean"])
    check(stats.column_variance(), expected["variance"])
    assert stats.num_samples == 12 and stats.num_tokens == 2 * 7 + 4 * 7 + 3 + 15 + 18


def test_variance_is_per_sample_as_the_official_dsnot() -> None:
    """Two samples whose tokens are constant (0 and 2): each has variance 0 over its tokens, so
    the column variance is 0, although the batch's tokens spread (a per-batch variance: 1)."""
    x = torch.stack([torch.zeros(4, 6), torch.full((4, 6), 2.0)])  # (2 samples, 4 tokens, 6)
    stats = InputStatistics(6)
    stats.update(x, 1.0)
    assert torch.equal(stats.column_variance(), torch.zeros(6))
    assert torch.equal(stats.column_mean(), torch.ones(6))
    y = torch.tensor([[0.0, 2.0], [4.0, 4.0]]).reshape(1, 4, 1).expand(1, 4, 6)  # one sample
    one = InputStatistics(6)
    one.update(y, 0.5)
    torch.testing.assert_close(one.column_variance(), torch.full((6,), 2.75))  # var(0,2,4,4)


def test_invariant_to_how_samples_are_split_into_batches() -> None:
    x = torch.randn(8, 5, 6, generator=torch.Generator().manual_seed(3))
    whole = InputStatistics(6)
    whole.update(x, 1.1)
    split = InputStatistics(6)
    for part in (x[:3], x[3:4], x[4:]):
        split.update(part, 1.1)
    torch.testing.assert_close(whole.hessian_matrix(), split.hessian_matrix())
    torch.testing.assert_close(whole.column_sq_norms(), split.column_sq_norms())
    torch.testing.assert_close(whole.column_sum_per_sample(), split.column_sum_per_sample())


def test_merging_partial_statistics_is_exact() -> None:
    """What an all-reduce over data-parallel ranks does: the sum of parts equals the whole."""
    data = batches(1)
    whole = accumulate(data)
    rank0, rank1 = accumulate(data[:2]), accumulate(data[2:])
    summed = [a + b for a, b in zip(rank0.state_tensors(), rank1.state_tensors(), strict=True)]
    merged = rank0.merge_(rank1)
    for a, b in zip(merged.state_tensors(), whole.state_tensors(), strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(merged.state_tensors(), summed, strict=True):
        torch.testing.assert_close(a, b)


def test_low_precision_inputs_accumulate_in_float32() -> None:
    x = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(2)) * 30
    stats = InputStatistics(8)
    stats.update(x.to(torch.bfloat16), 1.0)
    assert stats.xtx is not None and stats.xtx.dtype == torch.float32
    reference = (
        2
        * x.to(torch.bfloat16).double().reshape(-1, 8).T
        @ x.to(torch.bfloat16).double().reshape(-1, 8)
        / 4
    )
    torch.testing.assert_close(stats.hessian_matrix().double(), reference, rtol=1e-5, atol=1e-3)


def test_one_shared_accumulator_serves_modules_reading_the_same_input() -> None:
    """q/k/v read one input: one Hessian gives the OBS results of three at a third of the memory."""
    g = torch.Generator().manual_seed(4)
    data = [torch.randn(2, 10, 16, generator=g) for _ in range(3)]
    weights = [torch.randn(16, 16, generator=g) for _ in range(3)]
    shared = InputStatistics(16, moments=False)
    separate = [InputStatistics(16, moments=False) for _ in weights]
    for x in data:
        shared.update(x, 1.0)
        for stats in separate:
            stats.update(x, 1.0)
    for W, own in zip(weights, separate, strict=True):
        a = obs_prune(W, shared.hessian_matrix(), Unstructured(0.5), blocksize=8)
        b = obs_prune(W, own.hessian_matrix(), Unstructured(0.5), blocksize=8)
        assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)
    assert shared.nbytes() * 3 == sum(s.nbytes() for s in separate)


def test_bad_input_is_refused() -> None:
    stats = InputStatistics(4, hessian=False)
    with pytest.raises(ValueError, match="input has 5 features"):
        stats.update(torch.zeros(2, 5), 1.0)
    with pytest.raises(ValueError, match="must be > 0"):
        stats.update(torch.zeros(2, 4), 0.0)
    with pytest.raises(RuntimeError, match="no calibration data"):
        stats.column_sq_norms()
    stats.update(torch.ones(2, 4), 1.0)
    with pytest.raises(RuntimeError, match="without the Hessian"):
        stats.hessian_matrix()
    with pytest.raises(ValueError, match="normaliser"):
        InputStatistics(4).hessian_matrix("batch")
    with pytest.raises(ValueError):
        InputStatistics(4, hessian=False, moments=False)


def test_reduced_precision_products_accumulate_in_float32() -> None:
    x = torch.randn(3, 20, 16, generator=torch.Generator().manual_seed(6))
    exact = InputStatistics(16, moments=False)
    low = InputStatistics(16, moments=False, hessian_precision="bfloat16")
    tf32 = InputStatistics(16, moments=False, hessian_precision="tf32")
    for stats in (exact, low, tf32):
        stats.update(x, 1.2)
    rounded = x.to(torch.bfloat16).to(torch.float32).reshape(-1, 16)
    assert low.xtx is not None and low.xtx.dtype == torch.float32
    torch.testing.assert_close(low.xtx, 1.2 * rounded.T @ rounded)
    torch.testing.assert_close(low.hessian_matrix(), exact.hessian_matrix(), rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(tf32.hessian_matrix(), exact.hessian_matrix())  # CPU: plain float32
    with pytest.raises(ValueError, match="hessian_precision="):
        InputStatistics(4, hessian_precision="fp8")
