"""Low-rank factors of a linear under its weighted input statistics (`obsdiff.pruning.low_rank`),
against closed forms in float64; the low-rank module and its settings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from obsdiff.methods.modulation import LowRankModulation
from obsdiff.models.surgery import LowRankLinear, factorised_linear, restore_shapes, shapes
from obsdiff.pruning.low_rank import energy_rank, kept_energy, low_rank_factors, output_spectrum


pytestmark = pytest.mark.unit


def weighted_data(
    out_features: int, in_features: int, samples: int, span: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W (out, in), X (samples, in), alpha (samples,)) in float64; X's rows in a `span`-
    dimensional subspace when given."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    x = torch.randn(samples, span or in_features, generator=generator, dtype=torch.float64)
    if span is not None:
        x = x @ torch.randn(span, in_features, generator=generator, dtype=torch.float64)
    alpha = torch.rand(samples, generator=generator, dtype=torch.float64) + 0.1
    return weight, x, alpha


def weighted_error(weight: torch.Tensor, product: torch.Tensor, x: torch.Tensor,
                   alpha: torch.Tensor) -> float:  # fmt: skip
    """sum_t alpha_t ||(W - BA) x_t||^2."""
    residual = x @ (weight - product).T  # (samples, out)
    return float((alpha[:, None] * residual**2).sum())


def test_the_factors_reach_the_eckart_young_bound_and_the_whitened_svd() -> None:
    """The error of B A is the sum of the squared singular values of W X^T sqrt(alpha) after
    the r-th (no rank-r matrix does better), and B A equals the whitened SVD's product
    (W L)_r L^-1 when H is invertible."""
    weight, x, alpha = weighted_data(12, 8, 50)
    hessian = x.T @ (alpha[:, None] * x)  # (in, in)
    directions, singular_values = output_spectrum(weight, hessian)
    bound = torch.linalg.svdvals(weight @ (x * alpha[:, None].sqrt()).T)[:8]  # rank <= in
    torch.testing.assert_close(singular_values, bound)
    for rank in (1, 3, 6):
        up, down = low_rank_factors(weight, directions, rank)
        assert up.shape == (12, rank) and down.shape == (rank, 8)
        error = weighted_error(weight, up @ down, x, alpha)
        assert error == pytest.approx(float((bound[rank:] ** 2).sum()), rel=1e-9)
        factor = torch.linalg.cholesky(hessian)  # H = L L^T
        u, s, vh = torch.linalg.svd(weight @ factor)
        whitened = (u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(factor)
        torch.testing.assert_close(up @ down, whitened)
        other = torch.randn(12, rank, dtype=torch.float64) @ torch.randn(
            rank, 8, dtype=torch.float64
        )
        assert weighted_error(weight, other, x, alpha) > error


def test_a_rank_deficient_input_is_reproduced_exactly_without_damping() -> None:
    """Inputs in a 3-dimensional subspace (a modulation that reads the timestep alone, 3
    steps): at rank 3 the product equals W on every input seen, to round-off; energy 1."""
    weight, x, alpha = weighted_data(16, 10, 40, span=3)
    hessian = x.T @ (alpha[:, None] * x)
    directions, singular_values = output_spectrum(weight, hessian)
    up, down = low_rank_factors(weight, directions, 3)
    torch.testing.assert_close(x @ (up @ down).T, x @ weight.T, rtol=1e-10, atol=1e-10)
    assert kept_energy(singular_values, 3) == pytest.approx(1.0, abs=1e-12)
    assert energy_rank(singular_values, 1.0) == 3


def test_the_energy_rank_is_the_smallest_that_keeps_the_share() -> None:
    values = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert [energy_rank(values, e) for e in (0.5, 9 / 14, 0.9, 13 / 14, 0.99, 1.0)] == [
        1, 1, 2, 2, 3, 3,
    ]  # fmt: skip
    assert kept_energy(values, 2) == pytest.approx(13 / 14)


def test_a_factorised_linear_computes_the_product_and_reloads_from_its_structure() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 24), nn.SiLU(), nn.Linear(24, 4))
    linear: nn.Linear = model[0]  # type: ignore[assignment]
    up, down = torch.randn(24, 2), torch.randn(2, 6)
    low = factorised_linear(linear, up, down)
    x = torch.randn(5, 6)
    torch.testing.assert_close(low(x), x @ (up @ down).T + linear.bias)
    torch.testing.assert_close(low.dense_weight(), up @ down)
    model[0] = low
    structure = shapes(model)
    assert structure["low_rank"] == {"0": 2}
    fresh = nn.Sequential(nn.Linear(6, 24), nn.SiLU(), nn.Linear(24, 4))
    restore_shapes(fresh, structure)
    assert isinstance(fresh[0], LowRankLinear)
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), model(x))
    weights = 6 * 24 + 24 * 4 + 24 + 4
    assert sum(p.numel() for p in fresh.parameters()) == weights - 6 * 24 + 2 * (6 + 24)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one of modulation.rank, modulation.energy and modulation.budget"),
        ({"rank": 4, "energy": 0.9}, r"\(given: rank, energy\)"),
        ({"rank": 0}, "modulation.rank=0 must be >= 1"),
        ({"energy": 1.5}, r"modulation.energy=1.5 must be in \(0, 1\]"),
        ({"energy": 0.0}, r"modulation.energy=0.0 must be in \(0, 1\]"),
        ({"budget": 1.0}, r"modulation.budget=1.0 must be in \(0, 1\)"),
    ],
)
def test_bad_modulation_settings_are_refused(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LowRankModulation(**options)  # type: ignore[arg-type]


def test_a_rank_wider_than_a_linear_is_refused_naming_the_largest_that_fits() -> None:
    model = nn.Sequential(nn.Linear(6, 24), nn.Linear(24, 48))
    with pytest.raises(ValueError, match=r"modulation.rank=7 is larger than 0 \(24 x 6\).*=6"):
        LowRankModulation(rank=7).check_widths(model, ["0", "1"])
    LowRankModulation(rank=6).check_widths(model, ["0", "1"])
    budget = LowRankModulation(budget=0.5)
    assert budget.choose_rank(torch.ones(6), (24, 6)) == int(0.5 * 24 * 6 / 30)
