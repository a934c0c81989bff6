"""Timestep weighting schedules for the timestep-aware Hessian (paper Sec. 4.1, Eq. 3-5).

Step t = 1..T in inference order (t = 1 is the first, noisiest step). Each schedule returns the
weights alpha_1..alpha_T as a float64 tensor of length T; T is bound at call time (it is the
calibration run's number of sampling steps). Only relative weights matter: the OBS masks and
updates are invariant to a common scale of H, because damping is relative to mean(diag H).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


ALPHA_MIN = 0.8  # the reference code's defaults; the paper does not state them
ALPHA_MAX = 1.2

Schedule = Callable[..., torch.Tensor]


def _check(num_steps: int, alpha_min: float, alpha_max: float) -> None:
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be an integer >= 1")
    if not (alpha_min > 0 and alpha_max > 0):
        raise ValueError(f"alpha_min={alpha_min} and alpha_max={alpha_max} must both be > 0")
    if alpha_min > alpha_max:
        raise ValueError(f"alpha_min={alpha_min} must not exceed alpha_max={alpha_max}")


def uniform(
    num_steps: int, alpha_min: float = ALPHA_MIN, alpha_max: float = ALPHA_MAX
) -> torch.Tensor:
    """alpha_t = 1 for every step (the plain, timestep-agnostic Hessian)."""
    _check(num_steps, alpha_min, alpha_max)
    return torch.ones(num_steps, dtype=torch.float64)


def linear_increase(
    num_steps: int, alpha_min: float = ALPHA_MIN, alpha_max: float = ALPHA_MAX
) -> torch.Tensor:
    """alpha_min at the first step rising linearly to alpha_max at the last."""
    _check(num_steps, alpha_min, alpha_max)
    return torch.linspace(alpha_min, alpha_max, num_steps, dtype=torch.float64)


def linear_decrease(
    num_steps: int, alpha_min: float = ALPHA_MIN, alpha_max: float = ALPHA_MAX
) -> torch.Tensor:
    """alpha_max at the first step falling linearly to alpha_min at the last."""
    _check(num_steps, alpha_min, alpha_max)
    return torch.linspace(alpha_max, alpha_min, num_steps, dtype=torch.float64)


def log_increase(
    num_steps: int, alpha_min: float = ALPHA_MIN, alpha_max: float = ALPHA_MAX
) -> torch.Tensor:
    """alpha_t = alpha_min + (alpha_max - alpha_min) / ln T * ln t: Eq. 4 mirrored in time."""
    _check(num_steps, alpha_min, alpha_max)
    if num_steps == 1:
        return torch.full((1,), float(alpha_min), dtype=torch.float64)
    t = torch.arange(1, num_steps + 1, dtype=torch.float64)
    return alpha_min + (alpha_max - alpha_min) / math.log(num_steps) * torch.log(t)


def log_decrease(
    num_steps: int, alpha_min: float = ALPHA_MIN, alpha_max: float = ALPHA_MAX
) -> torch.Tensor:
    """Eq. 4, the paper's choice.

    alpha_t = alpha_min + (alpha_max - alpha_min) / ln T * ln(T - t + 1), t = 1..T, so that
    alpha_1 = alpha_max and alpha_T = alpha_min; most of the drop happens in the last steps.
    """
    _check(num_steps, alpha_min, alpha_max)
    if num_steps == 1:
        return torch.full((1,), float(alpha_max), dtype=torch.float64)
    t = torch.arange(1, num_steps + 1, dtype=torch.float64)
    return alpha_min + (alpha_max - alpha_min) / math.log(num_steps) * torch.log(num_steps - t + 1)


def explicit(num_steps: int, weights: Sequence[float]) -> torch.Tensor:
    """A user-given list of T positive weights, first step first."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be an integer >= 1")
    if len(weights) != num_steps:
        raise ValueError(
            f"explicit timestep weights have {len(weights)} entries but the calibration runs "
            f"{num_steps} steps; give exactly one weight per step"
        )
    values = torch.tensor([float(w) for w in weights], dtype=torch.float64)
    if not bool((values > 0).all()):
        raise ValueError(f"explicit timestep weights must all be > 0, got {list(weights)}")
    return values


SCHEDULES: dict[str, Schedule] = {
    "uniform": uniform,
    "linear_increase": linear_increase,
    "linear_decrease": linear_decrease,
    "log_increase": log_increase,
    "log_decrease": log_decrease,
}


def timestep_weights(
    scheme: str, num_steps: int, alpha_min: float = ALPHA_MIN, alpha_max: float = ALPHA_MAX
) -> torch.Tensor:
    """The weights of a named scheme (one of `SCHEDULES`) for `num_steps` steps."""
    if scheme not in SCHEDULES:
        raise ValueError(f"unknown timestep weighting {scheme!r}; use one of {sorted(SCHEDULES)}")
    return SCHEDULES[scheme](num_steps, alpha_min, alpha_max)


@dataclass
class TimestepWeighting:
    """A weighting scheme (the `weighting` config group); T is bound by `step_weights(T)`.

    Attributes:
        scheme: One of `SCHEDULES`, or `explicit`.
        alpha_min: The smallest weight (the reference code's 0.8; the paper states none).
        alpha_max: The largest weight (the reference code's 1.2).
        weights: `explicit` only: one positive weight per sampling step, first step first.
    """

    scheme: str
    alpha_min: float = ALPHA_MIN
    alpha_max: float = ALPHA_MAX
    weights: list[float] | None = None

    def __post_init__(self) -> None:
        if self.scheme == "explicit":
            if not self.weights:
                raise ValueError("the explicit weighting needs `weights`, one per sampling step")
            explicit(len(self.weights), self.weights)  # validates
        elif self.scheme not in SCHEDULES:
            known = sorted(SCHEDULES) + ["explicit"]
            raise ValueError(f"unknown timestep weighting {self.scheme!r}; use one of {known}")
        else:
            _check(1, self.alpha_min, self.alpha_max)

    def step_weights(self, num_steps: int) -> torch.Tensor:
        """alpha_1..alpha_T for T = `num_steps` (float64)."""
        if self.scheme == "explicit":
            assert self.weights is not None
            return explicit(num_steps, self.weights)
        return SCHEDULES[self.scheme](num_steps, self.alpha_min, self.alpha_max)

    def describe(self, num_steps: int) -> dict[str, object]:
        return {
            "scheme": self.scheme,
            "alpha_min": self.alpha_min,
            "alpha_max": self.alpha_max,
            "weights": [round(float(w), 6) for w in self.step_weights(num_steps)],
        }
