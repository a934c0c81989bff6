"""Importance-weighted OBS (`method.token_weighting`): the weighted Hessian kernel against a sum
over rows in float64, all-ones weights giving today's bits, and the map-to-token rule (levels,
[text, image] layouts, raster order, mean 1 per sample)."""

from __future__ import annotations

import pytest
import torch

from obsdiff.calibration.hooks import token_positions, token_sample
from obsdiff.calibration.token_maps import (
    AMBIGUOUS,
    IMAGE,
    JOINT,
    TEXT,
    UNMATCHED,
    ImportanceMaps,
    level_sizes,
    mean_one,
    pyramid,
    token_layout,
    token_weights,
)
from obsdiff.methods import ObsDiff
from obsdiff.pruning import InputStatistics


pytestmark = pytest.mark.unit


def weighted_batches(seed: int = 0) -> list[tuple[torch.Tensor, float, torch.Tensor]]:
    """(x (B, T, 6), alpha, w (B, T)) batches of different sample and token counts."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 7), (4, 5), (1, 3)]
    return [
        (torch.randn(b, t, 6, generator=g) + 0.5, alpha, torch.rand(b, t, generator=g) * 2)
        for (b, t), alpha in zip(shapes, [1.2, 1.0, 0.8], strict=True)
    ]


def test_weighted_hessian_is_the_sum_of_weighted_rows_in_float64() -> None:
    data = weighted_batches()
    stats = InputStatistics(6)
    for x, alpha, w in data:
        stats.update(x, alpha, token_weights=w)
    xtx = torch.zeros(6, 6, dtype=torch.float64)
    for x, alpha, w in data:  # brute force: alpha w_i x_i^T x_i, row by row
        for row, weight in zip(x.reshape(-1, 6).double(), w.reshape(-1).double(), strict=True):
            xtx += alpha * weight * torch.outer(row, row)
    samples = sum(alpha * x.shape[0] for x, alpha, _ in data)
    expected = 2 * xtx / samples  # the kernel sums in float32: its rounding, no more
    torch.testing.assert_close(stats.hessian_matrix().double(), expected, rtol=1e-6, atol=1e-5)
    assert stats.num_samples == 7 and stats.num_tokens == 2 * 7 + 4 * 5 + 3  # counts unweighted


def test_all_ones_weights_give_the_unweighted_bits() -> None:
    data = weighted_batches(1)
    plain, ones, broadcast = InputStatistics(6), InputStatistics(6), InputStatistics(6)
    for x, alpha, w in data:
        plain.update(x, alpha, token_scale=1.5)
        ones.update(x, alpha, token_scale=1.5, token_weights=torch.ones_like(w))
        broadcast.update(x, alpha, token_scale=1.5, token_weights=torch.ones(x.shape[0], 1))
    for other in (ones, broadcast):
        for a, b in zip(plain.state_tensors(), other.state_tensors(), strict=True):
            assert torch.equal(a, b)


def test_only_the_hessian_is_weighted() -> None:
    """Wanda's and DSnoT's moments ignore the token weights; the Hessian does not."""
    x, alpha, w = weighted_batches(2)[0]
    plain, weighted = InputStatistics(6), InputStatistics(6)
    plain.update(x, alpha)
    weighted.update(x, alpha, token_weights=w)
    assert torch.equal(plain.column_sq_norms(), weighted.column_sq_norms())
    assert torch.equal(plain.column_variance(), weighted.column_variance())
    assert not torch.allclose(plain.hessian_matrix(), weighted.hessian_matrix())


def test_the_pyramid_pools_two_by_two_in_raster_order() -> None:
    grid = torch.zeros(1, 5, 6)  # (B, H, W): odd height, pooled with ceil as a UNet's convs
    grid[0, 4, 5] = 1.0
    levels = pyramid(grid)
    assert [level.shape[1] for level in levels] == [30, 9, 4, 1] == level_sizes((5, 6))
    assert int(levels[0].argmax()) == 4 * 6 + 5  # row-major
    assert int(levels[1].argmax()) == 2 * 3 + 2
    video = torch.zeros(2, 3, 4, 4)  # (B, F, H, W): frames kept, each frame pooled
    assert level_sizes((3, 4, 4)) == [48, 12, 3]
    assert pyramid(video)[1].shape == (2, 12)
    assert [level.shape for level in pyramid(torch.ones(2, 7))] == [(2, 7)]  # flat: one level


@pytest.mark.parametrize(
    ("grid", "tokens", "text", "expected"),
    [
        ((16, 16), 256, 77, (IMAGE, 0)),  # a DiT's image stream (Flux, Qwen-Image)
        ((16, 16), 77, 77, (TEXT, -1)),  # its text stream
        ((16, 16), 333, 77, (JOINT, 0)),  # Flux's single-stream blocks: [text, image]
        ((32, 32), 256, 77, (IMAGE, 1)),  # a UNet's second level
        ((3, 4, 4), 48, 64, (IMAGE, 0)),  # Wan: frames x patches
        ((16, 16), 64, 64, (AMBIGUOUS, -1)),  # tiny FLUX.2's text: 64 tokens, as an 8 x 8 level
        ((16, 16), 100, 77, (UNMATCHED, -1)),
        ((16, 16), 256, None, (IMAGE, 0)),
    ],
)
def test_token_layout(
    grid: tuple[int, ...], tokens: int, text: int | None, expected: tuple[str, int]
) -> None:
    assert token_layout(grid, tokens, text) == expected


def test_token_weights_have_mean_one_and_text_tokens_weigh_one() -> None:
    maps = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0))  # (B, H, W)
    image = token_weights(maps, 16, text_tokens=5)
    assert image is not None and image.shape == (2, 16)
    torch.testing.assert_close(image.mean(1), torch.ones(2))
    torch.testing.assert_close(image, maps.flatten(1) / maps.flatten(1).mean(1, keepdim=True))
    joint = token_weights(maps, 5 + 16, text_tokens=5)
    assert joint is not None and joint.shape == (2, 21)
    assert torch.equal(joint[:, :5], torch.ones(2, 5)) and torch.equal(joint[:, 5:], image)
    torch.testing.assert_close(joint.mean(1), torch.ones(2))
    coarse = token_weights(maps, 4, text_tokens=5)  # 2 x 2 pooled
    assert coarse is not None
    torch.testing.assert_close(coarse.mean(1), torch.ones(2))
    assert token_weights(maps, 5, text_tokens=5) is None  # the text stream: uniform
    assert token_weights(maps, 7, text_tokens=5) is None  # no layout: uniform
    assert torch.equal(mean_one(torch.zeros(1, 3)), torch.ones(1, 3))  # no response: uniform


def test_maps_are_indexed_by_prompt_number() -> None:
    """A rank's maps start at its shard's first prompt."""
    by_step = [torch.arange(3.0).view(3, 1, 1).expand(3, 2, 2) + 10 * step for step in range(2)]
    maps = ImportanceMaps(by_step, first_prompt=4)
    assert torch.equal(maps.batch(5, 2, 1)[:, 0, 0], torch.tensor([11.0, 12.0]))
    assert torch.equal(maps.batch(4, 1, 7)[:, 0, 0], torch.tensor([10.0]))  # the last step's
    with pytest.raises(IndexError, match="not among this rank's maps"):
        maps.batch(2, 2, 0)


def test_token_positions_are_token_samples() -> None:
    x = torch.randn(2, 50, 3)
    kept, scale = token_positions(x, 20, seed=1, call=3)
    sample, same_scale = token_sample(x, 20, seed=1, call=3)
    assert kept is not None and scale == same_scale == 5.0
    assert torch.equal(sample, x[:, kept])
    assert token_positions(x, 200, 1, 3) == (None, 1.0)


def test_an_unknown_token_weighting_is_refused() -> None:
    options = "use one of none, cfg_response, attention"
    with pytest.raises(ValueError, match=f"method.token_weighting='saliency'; {options}"):
        ObsDiff(token_weighting="saliency")
    assert ObsDiff().describe()["token_weighting"] == "none"
