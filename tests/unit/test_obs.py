"""OBS unstructured / N:M: the reference chain, closed forms, exact patterns, damping."""

from __future__ import annotations

import logging
from types import ModuleType

import pytest
import torch
from kernel_data import output_error

from obsdiff.pruning import (
    NM,
    HessianFactorizationError,
    ObsProblem,
    Unstructured,
    inverse_cholesky_upper,
    magnitude_prune,
    num_to_prune,
    obs_prune,
    obs_prune_problems,
    obs_saliency,
    wanda_prune,
)
from obsdiff.pruning.obs import damped_cholesky


pytestmark = pytest.mark.unit

PATTERNS = [Unstructured(0.5), Unstructured(0.3), NM(2, 4), NM(4, 8)]


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_matches_the_straightforward_sparsegpt_chain(
    pattern, layer_data, bench_kernels: ModuleType
) -> None:  # type: ignore[no-untyped-def]
    W, _, H = layer_data(24, 96, seed=1)
    ours = obs_prune(W, H, pattern, blocksize=32)
    W_ref, mask_ref = bench_kernels.reference_sparsegpt(W, H, pattern, blocksize=32)
    assert torch.equal(ours.mask, mask_ref)
    torch.testing.assert_close(ours.weight, W_ref, rtol=0, atol=1e-9)


def test_unstructured_sparsity_is_exact_per_layer_and_per_block(layer_data) -> None:  # type: ignore[no-untyped-def]
    W, _, H = layer_data(10, 64, seed=2)
    result = obs_prune(W, H, Unstructured(0.37), blocksize=16)
    assert int(result.mask.sum()) == num_to_prune(W.numel(), 0.37)
    for i1 in range(0, 64, 16):
        count = int(result.mask[:, i1 : i1 + 16].sum())
        assert abs(count - 0.37 * 10 * 16) < 1.0
    assert bool((result.weight[result.mask] == 0).all())


@pytest.mark.parametrize("pattern", [NM(2, 4), NM(4, 8), NM(1, 4)], ids=str)
def test_nm_pattern_holds_in_every_group(pattern: NM, layer_data) -> None:  # type: ignore[no-untyped-def]
    W, _, H = layer_data(12, 64, seed=3)
    result = obs_prune(W, H, pattern, blocksize=32)
    groups = result.mask.reshape(12, 64 // pattern.m, pattern.m).sum(-1)
    assert bool((groups == pattern.n).all())


def test_one_weight_matches_the_closed_form_obs(layer_data) -> None:  # type: ignore[no-untyped-def]
    """Eq. 2: removing w_q costs w_q^2 / (2 [H^-1]_qq), w moves by -(w_q / [H^-1]_qq) H^-1_{:,q}."""
    W, _, H = layer_data(3, 20, seed=4)
    Hinv = torch.linalg.inv(H)
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask[:, 0] = True  # the first column: SparseGPT compensates over every other column
    result = obs_prune(W, H, Unstructured(0.05), percdamp=0.0, mask=mask)
    expected = W - (W[:, :1] / Hinv[0, 0]) * Hinv[0].unsqueeze(0)
    torch.testing.assert_close(result.weight, expected, rtol=1e-9, atol=1e-9)
    saliency = W[:, 0].square() / (2 * Hinv[0, 0])
    assert result.loss == pytest.approx(float(saliency.sum()), rel=1e-9)
    torch.testing.assert_close(obs_saliency(W, H, percdamp=0.0)[:, 0], 2 * saliency)
    # the objective (W - W') H (W - W')^T / 2 rises by exactly the saliency
    delta = W - result.weight
    rise = torch.einsum("ri,ij,rj->r", delta, H, delta) / 2
    torch.testing.assert_close(rise, saliency)


def test_compensation_never_hurts_a_fixed_mask(layer_data) -> None:  # type: ignore[no-untyped-def]
    """With the default damping. (Left-to-right compensation is greedy: with percdamp=0 on an
    ill-conditioned H it was seen to lose to plain zeroing for some random masks.)"""
    for seed in range(6):
        W, X, H = layer_data(16, 48, seed=seed)
        mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(seed)) < 0.5
        compensated = obs_prune(W, H, Unstructured(0.5), mask=mask)
        zeroed = obs_prune(W, H, Unstructured(0.5), mask=mask, compensate=False)
        assert torch.equal(compensated.mask, mask) and torch.equal(zeroed.mask, mask)
        torch.testing.assert_close(zeroed.weight, W.masked_fill(mask, 0))
        assert output_error(W, compensated.weight, X) <= output_error(W, zeroed.weight, X)


@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4)], ids=str)
def test_obs_beats_wanda_beats_magnitude_on_outlier_inputs(pattern, layer_data) -> None:  # type: ignore[no-untyped-def]
    errors = {"obs": 0.0, "wanda": 0.0, "magnitude": 0.0}
    for seed in range(5):
        W, X, H = layer_data(64, 128, tokens=1024, seed=seed)
        norms = X.square().sum(0)
        errors["obs"] += output_error(W, obs_prune(W, H, pattern, blocksize=32).weight, X)
        errors["wanda"] += output_error(W, wanda_prune(W, norms, pattern)[0], X)
        errors["magnitude"] += output_error(W, magnitude_prune(W, pattern)[0], X)
    assert errors["obs"] < errors["wanda"] < errors["magnitude"]


@pytest.mark.parametrize("pattern", [Unstructured(0.4), NM(2, 4)], ids=str)
def test_problems_solved_together_equal_layer_by_layer(pattern, layer_data) -> None:  # type: ignore[no-untyped-def]
    """Stacking layers of one input and batching equal-size Hessians changes no result."""
    W1, _, H1 = layer_data(8, 32, seed=5)
    W2, _, H2 = layer_data(8, 32, seed=6)
    W3 = W1.flip(0) * 0.5
    problems = [
        ObsProblem(H1, [W1, W3]),
        ObsProblem(H2, [W2, W2 + 1]),
        ObsProblem(H2[:16, :16], [W2[:, :16]]),
    ]
    together = obs_prune_problems(problems, pattern, blocksize=8)
    for problem, results in zip(problems, together, strict=True):
        assert len(results) == len(problem.weights)
        for W, result in zip(problem.weights, results, strict=True):
            alone = obs_prune(W, problem.hessian, pattern, blocksize=8)
            assert torch.equal(alone.mask, result.mask)
            torch.testing.assert_close(alone.weight, result.weight, rtol=1e-12, atol=1e-12)
            assert alone.loss == pytest.approx(result.loss)


def test_float32_weights_keep_their_dtype_and_shape(layer_data) -> None:  # type: ignore[no-untyped-def]
    W, _, H = layer_data(8, 32, seed=7)
    result = obs_prune(W.half(), H.float(), Unstructured(0.5), blocksize=16)
    assert result.weight.dtype == torch.float16 and result.weight.shape == (8, 32)


def test_dead_inputs_are_zeroed_not_nan(layer_data) -> None:  # type: ignore[no-untyped-def]
    W, _, H = layer_data(6, 16, seed=8)
    H[3, :] = 0
    H[:, 3] = 0
    result = obs_prune(W, H, Unstructured(0.5), blocksize=8)
    assert torch.isfinite(result.weight).all()
    assert bool((result.weight[:, 3] == 0).all())


def test_inverse_factor_equals_the_three_factorisation_chain(layer_data) -> None:  # type: ignore[no-untyped-def]
    _, _, H = layer_data(1, 40, seed=9)
    chain = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    U = inverse_cholesky_upper(H)
    torch.testing.assert_close(U, chain, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(H), rtol=1e-9, atol=1e-10)


def test_singular_hessian_escalates_damping_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    X = torch.randn(2, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    H = X.T @ X  # rank 2: not positive definite
    W = torch.randn(4, 8, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="obsdiff.pruning.obs"):
        result = obs_prune(W, H, Unstructured(0.5), blocksize=4, percdamp=0.0)
    assert "retrying with extra damping" in caplog.text
    assert torch.isfinite(result.weight).all() and int(result.mask.sum()) == 16
    with pytest.raises(HessianFactorizationError, match="not positive definite"):
        damped_cholesky(H, max_escalations=0)
    with pytest.raises(HessianFactorizationError):
        damped_cholesky(-torch.eye(3, dtype=torch.float64), max_escalations=2)


def test_bad_arguments_are_refused(layer_data) -> None:  # type: ignore[no-untyped-def]
    W, _, H = layer_data(4, 16, seed=10)
    with pytest.raises(ValueError, match="does not match"):
        obs_prune(W[:, :8], H, Unstructured(0.5))
    with pytest.raises(ValueError, match="multiple of M"):
        obs_prune(W, H, NM(2, 4), blocksize=6)
    with pytest.raises(ValueError, match="divisible by 8"):
        obs_prune(W[:, :12], H[:12, :12], NM(4, 8), blocksize=8)
    with pytest.raises(ValueError, match="square"):
        obs_prune(W, H[:, :8], Unstructured(0.5))
    with pytest.raises(ValueError):
        Unstructured(1.0)
    with pytest.raises(ValueError):
        NM(4, 4)
