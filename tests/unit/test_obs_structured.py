"""Structured OBS: neurons (Eq. 6), heads with reciprocal rank fusion (Eq. 7, 8), rounding."""

from __future__ import annotations

import pytest
import torch
from kernel_data import outlier_inputs

from obsdiff.pruning import (
    head_saliency,
    l1_select,
    l1_unit_scores,
    obs_prune_heads,
    obs_prune_neurons,
    reciprocal_rank_fusion,
    rrf_choice,
    structured_count,
)
from obsdiff.pruning.obs_structured import aligned_count, reference_chunk_sizes


pytestmark = pytest.mark.unit


def least_squares_optimum(W: torch.Tensor, H: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """argmin over W' with W'_{:,removed} = 0 of (W - W') H (W - W')^T, by brute force."""
    keep = torch.ones(H.shape[0], dtype=torch.bool)
    keep[removed] = False
    optimum = torch.zeros_like(W)
    optimum[:, keep] = W @ H[:, keep] @ torch.linalg.inv(H[keep][:, keep])
    return optimum


def objective(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    delta = W - W_new
    return float(torch.einsum("ri,ij,rj->", delta, H, delta))


def test_counts_round_like_python() -> None:
    assert structured_count(38, 0.25) == 10  # round(9.5): the paper's SD3.5-Large 25% head count
    assert structured_count(42, 0.25) == 10  # round(10.5) is 10: half to even
    assert structured_count(9728, 0.15) == 1459
    assert structured_count(24, 0.10) == 2
    with pytest.raises(ValueError):
        structured_count(10, 1.0)


def test_reference_chunk_schedule() -> None:
    assert reference_chunk_sizes(1536) == [512] + [64] * 16
    assert reference_chunk_sizes(100) == [64, 36]
    assert sum(reference_chunk_sizes(3000)) == 3000 and max(reference_chunk_sizes(3000)) == 1024


def test_one_neuron_matches_eq6(layer_data) -> None:  # type: ignore[no-untyped-def]
    W, _, H = layer_data(6, 24, seed=1)
    Hinv = torch.linalg.inv(H)
    q = int(torch.argmin(W.square().sum(0) / torch.diagonal(Hinv)))
    result = obs_prune_neurons(W, H, 1, percdamp=0.0)
    assert result.removed.tolist() == [q]
    expected = W - W[:, q : q + 1] @ Hinv[q : q + 1] / Hinv[q, q]
    torch.testing.assert_close(result.weights[0], expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("chunks", [[5], [3, 2], [1, 1, 1, 1, 1]])
def test_chunked_removal_is_the_least_squares_optimum(chunks: list[int], layer_data) -> None:  # type: ignore[no-untyped-def]
    W, _, H = layer_data(8, 32, seed=2)
    result = obs_prune_neurons(W, H, 5, percdamp=0.0, chunk_sizes=chunks)
    assert len(result.removed) == 5
    optimum = least_squares_optimum(W, H, result.removed)
    torch.testing.assert_close(result.weights[0], optimum, rtol=1e-8, atol=1e-8)
    # without compensation the later chunks rank the unchanged weights, as the reference code
    untouched = obs_prune_neurons(W, H, 5, percdamp=0.0, chunk_sizes=chunks, compensate=False)
    expected = W.clone()
    expected[:, untouched.removed] = 0
    assert len(untouched.removed) == 5 and torch.equal(untouched.weights[0], expected)
    if len(chunks) == 1:
        assert torch.equal(untouched.removed, result.removed)


def test_obs_neurons_beat_l1_on_an_ffn() -> None:
    """A GELU FFN on outlier inputs, 25% of neurons removed: OBS (Eq. 6) vs L1 (producer rows)."""
    obs_error = l1_error = 0.0
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        X = outlier_inputs(1024, 32, seed)  # (tokens, d)
        W_up = torch.randn(128, 32, generator=g, dtype=torch.float64) / 32**0.5
        W_down = torch.randn(32, 128, generator=g, dtype=torch.float64) / 128**0.5
        hidden = torch.nn.functional.gelu(X @ W_up.T)  # (tokens, 128)
        H = 2 * hidden.T @ hidden / len(hidden)
        count = structured_count(128, 0.25)
        obs = obs_prune_neurons(W_down, H, count)
        removed = l1_select(l1_unit_scores([W_up]), count)
        l1 = W_down.clone()
        l1[:, removed] = 0
        obs_error += objective(W_down, obs.weights[0], H)
        l1_error += objective(W_down, l1, H)
    assert obs_error < l1_error


def test_rrf_on_a_hand_made_example() -> None:
    """Eq. 8, k = 60: a head ranked first by one stream and last by the other beats a head ranked
    second by both; ranks are 1-based, lowest error first."""
    stream_a = torch.tensor([0.1, 0.5, 0.9])  # ranks 1, 2, 3
    stream_b = torch.tensor([0.9, 0.5, 0.1])  # ranks 3, 2, 1
    fused = reciprocal_rank_fusion([stream_a, stream_b], k=60)
    expected = torch.tensor([1 / 61 + 1 / 63, 2 / 62, 1 / 63 + 1 / 61], dtype=torch.float64)
    torch.testing.assert_close(fused, expected)
    assert fused[0] == fused[2]  # an exact tie: the same two terms
    assert rrf_choice([stream_a, stream_b]) == 0  # the first stream ranks head 0 better
    assert rrf_choice([stream_b, stream_a]) == 2  # ... and here head 2
    single = reciprocal_rank_fusion([torch.tensor([0.3, 0.1, 0.2])])
    assert torch.argsort(single, descending=True).tolist() == [1, 2, 0]


def test_head_saliencies_agree_on_a_diagonal_hessian_and_exact_is_the_true_error(
    layer_data,
) -> None:  # type: ignore[no-untyped-def]
    W, _, _ = layer_data(5, 12, seed=3)
    H_diag = torch.diag(torch.linspace(0.5, 3.0, 12, dtype=torch.float64))
    Hinv = torch.linalg.inv(H_diag)
    kinds = [head_saliency(W, Hinv, 4, k) for k in ("reference", "eq7", "exact")]
    torch.testing.assert_close(kinds[0], kinds[1])
    torch.testing.assert_close(kinds[1], kinds[2])
    _, _, H = layer_data(5, 12, seed=4)
    exact = head_saliency(W, torch.linalg.inv(H), 4, "exact")
    for head in range(3):
        removed = torch.arange(head * 4, head * 4 + 4)
        true_error = objective(W, least_squares_optimum(W, H, removed), H)
        assert exact[head].item() == pytest.approx(true_error, rel=1e-8)


def test_joint_attention_heads_with_two_streams(layer_data) -> None:  # type: ignore[no-untyped-def]
    W_img, _, H_img = layer_data(16, 32, seed=5)
    W_txt, _, H_txt = layer_data(16, 32, seed=6)
    result = obs_prune_heads([W_img, W_txt], [H_img, H_txt], head_dim=8, count=2)
    assert len(result.removed) == 2
    for W_new, W, H in zip(result.weights, [W_img, W_txt], [H_img, H_txt], strict=True):
        columns = (result.removed.unsqueeze(1) * 8 + torch.arange(8)).reshape(-1)
        assert bool((W_new[:, columns] == 0).all())
        kept = torch.ones(32, dtype=torch.bool)
        kept[columns] = False
        assert bool((W_new[:, kept] != 0).all())
        zeroed = W.clone()
        zeroed[:, columns] = 0
        assert objective(W, W_new, H) < objective(W, zeroed, H)
    plain = obs_prune_heads([W_img, W_txt], [H_img, H_txt], head_dim=8, count=2, compensate=False)
    assert torch.equal(plain.removed, result.removed)
    single = obs_prune_heads([W_img], [H_img], head_dim=8, count=3, saliency="exact")
    assert len(single.removed) == 3 and len(single.weights) == 1


def test_single_head_removal_with_exact_saliency_is_optimal(layer_data) -> None:  # type: ignore[no-untyped-def]
    W, _, H = layer_data(6, 16, seed=7)
    result = obs_prune_heads([W], [H], head_dim=4, count=1, percdamp=0.0, saliency="exact")
    errors = []
    for head in range(4):
        removed = torch.arange(head * 4, head * 4 + 4)
        errors.append(objective(W, least_squares_optimum(W, H, removed), H))
    assert result.removed.tolist() == [min(range(4), key=errors.__getitem__)]
    torch.testing.assert_close(
        result.weights[0],
        least_squares_optimum(
            W, H, torch.arange(result.removed.item() * 4, result.removed.item() * 4 + 4)
        ),
    )


def test_structured_arguments_are_checked(layer_data) -> None:  # type: ignore[no-untyped-def]
    W, _, H = layer_data(4, 12, seed=8)
    with pytest.raises(ValueError, match="whole number of heads"):
        obs_prune_heads([W], [H], head_dim=5, count=1)
    with pytest.raises(ValueError, match="cannot remove 3 of 3 heads"):
        obs_prune_heads([W], [H], head_dim=4, count=3)
    with pytest.raises(ValueError, match="one Hessian per output projection"):
        obs_prune_heads([W, W], [H], head_dim=4, count=1)
    with pytest.raises(ValueError, match="sum to 4"):
        obs_prune_neurons(W, H, 4, chunk_sizes=[1, 2])
    with pytest.raises(ValueError, match="head saliency"):
        head_saliency(W, H, 4, "l2")


def reference_rrf_choice(errors: list[torch.Tensor], k: float = 60.0) -> int:
    """The reference code's rule written out: fused scores in a dict filled in the first
    stream's ranking order, then the first of a stable descending sort."""
    fused: dict[int, float] = {}
    for error in errors:
        for rank, unit in enumerate(sorted(range(len(error)), key=lambda j: float(error[j]))):
            fused[unit] = fused.get(unit, 0.0) + 1 / (k + rank + 1)
    return sorted(fused, key=lambda unit: fused[unit], reverse=True)[0]


def test_rrf_choice_is_the_reference_rule_on_random_rankings() -> None:
    """Six heads, two streams of distinct errors: ties are frequent (a head ranked (a, b) ties
    one ranked (b, a)); the choice is the reference code's in every case, and differs from
    'lowest index among the tied' in some."""
    differs = ties = 0
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        errors = [torch.randperm(6, generator=g).double() for _ in range(2)]
        fused = reciprocal_rank_fusion(errors)
        assert rrf_choice(errors) == reference_rrf_choice(errors), seed
        ties += int((fused == fused.max()).sum()) > 1
        differs += rrf_choice(errors) != int(torch.argmax(fused))
    assert ties > 20 and differs > 5


def test_head_ties_follow_the_first_stream(layer_data) -> None:  # type: ignore[no-untyped-def]
    """Two heads whose two streams are mirror images tie in the fused score at every step: the
    head removed first is the one the first stream ranks better."""
    W, _, H = layer_data(8, 8, seed=11)  # two heads of 4 columns
    W_a = W.clone()
    W_a[:, :4] *= 0.5  # head 0 cheaper in stream a
    W_b = torch.cat([W_a[:, 4:], W_a[:, :4]], 1)  # stream b: the heads swapped
    H_b = H.clone()
    H_b[:4, :4], H_b[4:, 4:] = H[4:, 4:], H[:4, :4]
    H_b[:4, 4:], H_b[4:, :4] = H[4:, :4], H[:4, 4:]
    first = obs_prune_heads([W_a, W_b], [H, H_b], head_dim=4, count=1)
    second = obs_prune_heads([W_b, W_a], [H_b, H], head_dim=4, count=1)
    assert first.removed.tolist() == [0] and second.removed.tolist() == [1]


@pytest.mark.parametrize(
    ("total", "sparsity", "width", "align", "removed"),
    [
        (38, 0.3, 64, None, 11),  # round(11.4): no alignment
        (
            38,
            0.3,
            64,
            128,
            10,
        ),  # 27 heads left = 1728 channels; 28 (1792 = 14 x 128) is nearer than 26
        (38, 0.3, 64, 64, 11),  # every head count is a multiple of 64 channels
        (9728, 0.3, 1, 128, 2944),  # 6810 neurons left; 6784 is nearer than 6912
        (9728, 0.25, 1, 128, 2432),  # 7296 = 57 x 128 already
        (10, 0.9, 1, 4, 6),  # 1 left; at least one multiple: 4
        (6, 0.5, 1, 4, 2),  # 3 left: 4 (a tie with 0 is impossible: at least one multiple)
    ],
)
def test_aligned_counts_leave_widths_that_are_multiples(
    total: int, sparsity: float, width: int, align: int | None, removed: int
) -> None:
    count = aligned_count(total, sparsity, width, align)
    assert count == removed
    if align is not None:
        assert (total - count) * width % align == 0 and total - count >= 1


def test_an_alignment_wider_than_the_group_is_refused() -> None:
    with pytest.raises(ValueError, match=r"granularity.align=256: 3 units of width 64"):
        aligned_count(3, 0.3, 64, 256)
