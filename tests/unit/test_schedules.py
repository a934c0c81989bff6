"""Timestep weighting schedules (Eq. 4): endpoints, monotonicity, validation."""

from __future__ import annotations

import math

import pytest
import torch

from obsdiff.pruning import SCHEDULES, explicit, log_decrease, timestep_weights


pytestmark = pytest.mark.unit

DIRECTION = {
    "uniform": 0,
    "linear_increase": 1,
    "log_increase": 1,
    "linear_decrease": -1,
    "log_decrease": -1,
}


@pytest.mark.parametrize("scheme", sorted(SCHEDULES))
@pytest.mark.parametrize("steps", [2, 3, 25, 28])
def test_endpoints_and_monotonicity(scheme: str, steps: int) -> None:
    w = timestep_weights(scheme, steps, alpha_min=0.8, alpha_max=1.2)
    assert w.shape == (steps,) and w.dtype == torch.float64
    assert bool((w > 0).all())
    diffs = w[1:] - w[:-1]
    direction = DIRECTION[scheme]
    if direction == 0:
        assert torch.equal(w, torch.ones(steps, dtype=torch.float64))
    else:
        assert bool((diffs * direction >= -1e-12).all()), "not monotone"
        first, last = (0.8, 1.2) if direction > 0 else (1.2, 0.8)
        assert math.isclose(w[0].item(), first) and math.isclose(w[-1].item(), last)


def test_log_decrease_is_eq4() -> None:
    steps, a_min, a_max = 25, 0.7, 1.5
    expected = [
        a_min + (a_max - a_min) / math.log(steps) * math.log(steps - t + 1)
        for t in range(1, steps + 1)
    ]
    torch.testing.assert_close(
        log_decrease(steps, a_min, a_max), torch.tensor(expected, dtype=torch.float64)
    )
    # most of the drop happens in the last steps (the paper's observation)
    w = log_decrease(25)
    assert (w[0] - w[19]).item() < (w[19] - w[24]).item()


def test_single_step_and_explicit() -> None:
    assert timestep_weights("log_decrease", 1).tolist() == [1.2]
    assert timestep_weights("log_increase", 1).tolist() == [0.8]
    assert explicit(3, [3, 2, 1]).tolist() == [3.0, 2.0, 1.0]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: timestep_weights("log_decrease", 0), "num_steps"),
        (lambda: timestep_weights("log_decrease", 10, alpha_min=0.0), "> 0"),
        (
            lambda: timestep_weights("log_decrease", 10, alpha_min=1.3, alpha_max=1.2),
            "must not exceed",
        ),
        (lambda: timestep_weights("cosine", 10), "unknown timestep weighting"),
        (lambda: explicit(3, [1.0, 1.0]), "one weight per step"),
        (lambda: explicit(2, [1.0, -1.0]), "> 0"),
    ],
)
def test_invalid_schedules_are_refused(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        call()
