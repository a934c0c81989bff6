"""Diff-Pruning's Taylor scores in float64: each weight's score is, to first order, the loss
change of zeroing it; a group's is the sum of its members'; several levels add each level's
|w ⊙ g|; the walk stops by the official threshold rule; nothing but the targets takes a
gradient, and every flag is put back."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from obsdiff.pruning.taylor import check_threshold, taylor_scores


pytestmark = pytest.mark.unit


def model_and_loss() -> tuple[nn.Sequential, dict[str, nn.Linear], Callable[[int], torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).double()
    x = torch.randn(32, 8, dtype=torch.float64)
    y = torch.randn(32, 4, dtype=torch.float64)

    def loss_at(level: int) -> torch.Tensor:  # a different input scale at every level
        return nn.functional.mse_loss(model(x * (1 + 0.5 * level)), y)

    return model, {"0": model[0], "2": model[2]}, loss_at  # type: ignore[dict-item]


def test_a_weights_score_is_the_first_order_loss_change_of_zeroing_it() -> None:
    """d/ds L(w with w_i scaled by 1 - s) at s = 0 is the change of zeroing w_i to first
    order, -g_i w_i: its size is the score, to 1e-4 (a finite step of 1e-6 in float64)."""
    model, targets, loss_at = model_and_loss()
    scores = taylor_scores(model, targets, loss_at, levels=1)
    assert scores.levels == [0]
    with torch.no_grad():
        base = float(loss_at(0))
        for name, linear in targets.items():
            flat = scores.weights[name].flatten()
            for index in torch.randperm(flat.numel())[:12].tolist():
                row, column = divmod(index, linear.in_features)
                kept = float(linear.weight[row, column])
                eps = 1e-6  # the loss's derivative along zeroing the weight: exactly |w g|
                linear.weight[row, column] = kept * (1 - eps)
                change = (base - float(loss_at(0))) / eps
                linear.weight[row, column] = kept
                assert abs(change) == pytest.approx(float(flat[index]), rel=1e-4, abs=1e-10)


def test_a_groups_score_sums_its_members_and_levels_add_up() -> None:
    model, targets, loss_at = model_and_loss()
    scores = taylor_scores(model, targets, loss_at, threshold=1e-9, levels=3)
    assert scores.levels == [0, 1, 2] and len(scores.losses) == 3
    expected = {name: torch.zeros_like(linear.weight) for name, linear in targets.items()}
    for level in range(3):
        grads = torch.autograd.grad(loss_at(level), [linear.weight for linear in targets.values()])
        for (name, linear), grad in zip(targets.items(), grads, strict=True):
            expected[name] += (linear.weight.detach() * grad).abs()
    for name in targets:
        torch.testing.assert_close(scores.weights[name].double(), expected[name], rtol=1e-5, atol=0)
    neuron = 5  # a hidden neuron: its row of the first linear, its column of the second
    total = scores.group("0", rows=slice(neuron, neuron + 1))
    total += scores.group("2", columns=slice(neuron, neuron + 1))
    members = scores.weights["0"][neuron].sum() + scores.weights["2"][:, neuron].sum()
    assert total == pytest.approx(float(members))


def test_the_walk_stops_below_the_threshold_of_the_largest_loss() -> None:
    model, targets, _ = model_and_loss()
    values = [1.0, 4.0, 2.0, 0.3, 0.1, 0.05, 0.01]
    x = torch.randn(2, 8, dtype=torch.float64)

    def loss_at(level: int) -> torch.Tensor:
        return model(x).pow(2).mean() * 0 + values[level]

    scores = taylor_scores(model, targets, loss_at, threshold=0.05)
    assert scores.levels == [0, 1, 2, 3, 4] and scores.losses[-1] == pytest.approx(0.1)
    every = taylor_scores(model, targets, loss_at, threshold=1e-6, levels=7)
    assert every.levels == list(range(7))  # never below: every level


def test_only_the_targets_take_gradients_and_every_flag_is_restored() -> None:
    model, targets, loss_at = model_and_loss()
    model[2].bias.requires_grad_(False)
    seen = []
    model[0].bias.register_hook(lambda grad: seen.append(grad))
    taylor_scores(model, {"2": model[2]}, loss_at, levels=2)
    assert seen == []  # the first linear's bias never got a gradient
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False]


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5])
def test_a_threshold_outside_zero_one_is_refused(threshold: float) -> None:
    with pytest.raises(ValueError, match=rf"method.threshold={threshold} must lie in \(0, 1\]"):
        check_threshold(threshold)


def test_rows_and_columns_are_the_weights_sums_and_a_structured_walk_keeps_only_them() -> None:
    model, targets, loss_at = model_and_loss()
    full = taylor_scores(model, targets, loss_at, threshold=1e-9, levels=2)
    lines = taylor_scores(model, targets, loss_at, threshold=1e-9, levels=2, per_weight=False)
    assert lines.weights == {}
    for name in targets:
        torch.testing.assert_close(full.rows[name], full.weights[name].sum(1))
        torch.testing.assert_close(full.columns[name], full.weights[name].sum(0))
        torch.testing.assert_close(lines.rows[name], full.rows[name], rtol=0, atol=0)
        torch.testing.assert_close(lines.columns[name], full.columns[name], rtol=0, atol=0)


def test_a_neurons_score_bounds_the_first_order_loss_change_of_zeroing_it() -> None:
    """Zeroing a hidden neuron (its row of the first linear, its column of the second) changes
    the loss, to first order, by sum w g over its weights: the derivative along scaling them all
    by 1 - s, by finite differences in float64. Diff-Pruning's group score
    (`DiffPruning.unit_scores`) is sum |w g| over the same weights: the official importance, at
    least that change, equal to it where the members' w g share one sign (a single weight)."""
    from obsdiff.methods import DiffPruning
    from obsdiff.methods.package import UnitGroup

    model, targets, loss_at = model_and_loss()
    method = DiffPruning(levels=1)
    method.use_scores(taylor_scores(model, targets, loss_at, levels=1, per_weight=False))
    scores = method.unit_scores(UnitGroup("net", "neurons", (("0", 0),), (("2", 0),), 16, 1))
    first, second = model[0].weight, model[2].weight
    g_first, g_second = torch.autograd.grad(loss_at(0), [first, second])
    w_g = (first * g_first).sum(1) + (second * g_second).sum(0)  # (16,) signed, per neuron
    w_g_abs = (first * g_first).abs().sum(1) + (second * g_second).abs().sum(0)
    torch.testing.assert_close(scores, w_g_abs.detach(), rtol=1e-6, atol=0)
    with torch.no_grad():
        base = float(loss_at(0))
        for neuron in range(16):
            row, column = first[neuron].clone(), second[:, neuron].clone()
            eps = 1e-6
            first[neuron] *= 1 - eps
            second[:, neuron] *= 1 - eps
            change = (base - float(loss_at(0))) / eps
            first[neuron], second[:, neuron] = row, column
            assert change == pytest.approx(float(w_g[neuron]), rel=1e-4, abs=1e-10)
            assert abs(change) <= float(scores[neuron]) * (1 + 1e-4)
