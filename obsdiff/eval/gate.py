"""A quality gate: limits on an evaluation's metrics, each checked against the bound of its
interval that a reader would worry about, not its mean.

    python -m obsdiff.evaluate pruned=<run> 'gate="lpips<=0.15,psnr>=30"'
    python -m obsdiff.export <run> <out> --gate 'lpips<=0.15,psnr>=30'

(`<` and `>` need the shell's quotes, and Hydra's double quotes inside them.)

`lpips<=0.15` passes when the upper end of LPIPS's 95% bootstrap interval over prompts is at
most 0.15; `psnr>=30` when the lower end of PSNR's is at least 30. A metric without an interval
(one prompt, FID without its features) is checked by its value, and the check says so. The
dense-relative metrics compare each image with the dense model's of the same prompt and seed, so
a gate on them is the same-seed evidence against the dense model that a quantized or pruned
configuration is asked for.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


LIMIT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=)\s*([-+]?[0-9.]+(?:[eE][-+]?\d+)?)\s*$")
EXAMPLE = """'gate="lpips<=0.15,psnr>=30"'"""  # quoted for the shell, then for Hydra


class GateError(ValueError):
    """A gate that cannot be checked as written; raised before any model loads."""


@dataclass(frozen=True)
class Limit:
    """One limit: `metric <= value` (at most) or `metric >= value` (at least)."""

    metric: str
    bound: str  # "<=" or ">="
    value: float

    def __str__(self) -> str:
        return f"{self.metric}{self.bound}{self.value:g}"


@dataclass
class GateCheck:
    """One limit checked: what was measured (the interval's bound, or the value) and whether it
    held."""

    limit: str
    metric: str
    measured: float
    statistic: str  # "upper bound of the 95% interval", "value", ...
    passed: bool


def parse_gate(expressions: Sequence[str] | str | None, key: str = "gate") -> list[Limit]:
    """The limits of `gate` (a list of `<metric><=<value>` / `<metric>>=<value>`, or one such
    string, comma-separated); one GateError naming `key` and the form otherwise."""
    if expressions is None:
        return []
    if isinstance(expressions, str):
        expressions = [part for part in expressions.split(",") if part.strip()]
    limits = []
    for expression in expressions:
        match = LIMIT.match(str(expression))
        if match is None:
            raise GateError(
                f"{key}: {str(expression)!r} is not a limit; write <metric><=<value> or "
                f"<metric>>=<value>, e.g. {EXAMPLE}"
            )
        metric, bound, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            raise GateError(f"{key}: {value!r} in {expression!r} is not a number") from None
        limits.append(Limit(metric, bound, number))
    return limits


def check_gate_metrics(limits: Sequence[Limit], computed: Sequence[str], key: str = "gate") -> None:
    """GateError unless every limit's metric is among those the evaluation computes."""
    missing = [limit for limit in limits if limit.metric not in computed]
    if missing:
        raise GateError(
            f"{key}: {missing[0]} names {missing[0].metric!r}, which this evaluation does not "
            f"compute; it computes {sorted(computed)} (the dense-relative metrics need a pruned "
            "or quantized model and eval.dense_relative.enabled=true)"
        )


def gate_checks(
    limits: Sequence[Limit],
    metrics: dict[str, Any],
    intervals: dict[str, list[float]],
    confidence: float = 0.95,
) -> list[GateCheck]:
    """Each limit against the measured figures: the interval's upper bound for `<=`, its lower
    bound for `>=`; the value where there is no interval. A limit whose metric was not measured
    fails."""
    checks = []
    for limit in limits:
        interval = intervals.get(limit.metric)
        upper = limit.bound == "<="
        if interval is not None:
            measured = float(interval[1] if upper else interval[0])
            end = "upper" if upper else "lower"
            statistic = f"{end} bound of the {confidence:.0%} interval"
        elif limit.metric in metrics:
            measured, statistic = float(metrics[limit.metric]), "value (no interval)"
        else:
            measured, statistic = math.nan, "not measured"
        passed = not math.isnan(measured) and (
            measured <= limit.value if upper else measured >= limit.value
        )
        checks.append(GateCheck(str(limit), limit.metric, measured, statistic, passed))
    return checks


def gate_summary(checks: Sequence[GateCheck]) -> str:
    """One line per limit: `lpips<=0.15: passed (upper bound of the 95% interval 0.083)`."""
    return "\n".join(
        f"{check.limit}: {'passed' if check.passed else 'FAILED'} "
        f"({check.statistic} {check.measured:.4g})"
        for check in checks
    )
