"""Efficiency of a denoiser: parameters, TFLOPs and latency per forward and per image.

Latency is timed with CUDA events on a GPU and `perf_counter` on the CPU, after warm-up runs, at
the model's own sampling settings. A speed-up is only measured with both denoisers in one
process, alternately (`compare_latency`): latencies measured by different runs (a cached dense
evaluation, a loaded machine) do not compare.

Every timing keeps its per-repeat times and an interval. A latency is the median of its
one-image generations; a speed-up is the median of the per-repeat ratios dense / pruned (each
repeat times both back to back, so a change of load hits both sides of its ratio). Their
intervals are the distribution-free intervals of a median from its order statistics
(`median_interval`): they assume nothing about how timing noise is distributed (a load spike
makes one repeat an outlier), but need 6 repeats to reach 95%; with fewer they are the range of
the repeats and say their lower coverage (75% at 3 repeats). A speed-up whose interval contains
1 is within noise: the timings show no speed-up nor slow-down.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from diffusers import DiffusionPipeline
from scipy import stats
from torch import nn

from obsdiff.models.base import ModelAdapter
from obsdiff.models.experts import called_modules
from obsdiff.utils.flops import pipeline_flops


CONFIDENCE = 0.95  # the coverage the timing intervals aim at


class MedianInterval(NamedTuple):
    """An interval of a median and its coverage (CONFIDENCE where the repeats allow, less with
    fewer than 6)."""

    low: float
    high: float
    confidence: float


def median_interval(
    values: Sequence[float], confidence: float = CONFIDENCE
) -> MedianInterval | None:
    """The distribution-free interval of the median of `values`, from their order statistics:
    the narrowest [x_(k), x_(n+1-k)] whose coverage, 1 - 2 P(B <= k - 1) with B ~ Binomial(n,
    1/2), is at least `confidence`. With too few values to reach it (fewer than 6 for 95%) the
    range [min, max], with its own coverage 1 - 2^(1-n) (50% at 2 values, 75% at 3, 94% at 5).
    None for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return None
    ordered = sorted(values)

    def coverage(k: int) -> float:
        return float(1.0 - 2.0 * stats.binom.cdf(k - 1, n, 0.5))

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    return MedianInterval(ordered[k - 1], ordered[n - k], coverage(k))


def speedup_flags(interval: Sequence[float] | None, confidence: float | None) -> list[str]:
    """What qualifies a speed-up: `no interval` (fewer than 2 repeats, or a record from before
    intervals were kept), its interval's coverage where that is below CONFIDENCE, and `within
    noise` where its interval contains 1."""
    if interval is None:
        return ["no interval"]
    flags = []
    if confidence is not None and confidence < CONFIDENCE - 1e-9:
        flags.append(f"{confidence:.0%} interval")
    if interval[0] <= 1.0 <= interval[1]:
        flags.append("within noise")
    return flags


def format_speedup(
    speedup: float, interval: Sequence[float] | None, confidence: float | None
) -> str:
    """`2.013x [1.950, 2.080]`, `1.283x [0.951, 1.612] (75% interval, within noise)`."""
    text = f"{speedup:.3f}x"
    if interval is not None:
        text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    flags = speedup_flags(interval, confidence)
    return text + (f" ({', '.join(flags)})" if flags else "")


@dataclass
class Efficiency:
    """One pipeline's size, compute and latency at its own sampling settings. Records from
    before the per-repeat times were kept read with none ([] and None)."""

    params: int
    tflops_per_forward: float  # per sample
    seconds_per_image: float  # median of the timed one-image generations
    seconds_per_forward: float
    forwards_per_image: float
    num_inference_steps: int
    latency_device: str
    image_seconds: list[float] = field(default_factory=list)  # every timed generation, in order
    seconds_per_image_interval: list[float] | None = None  # [low, high] of the median
    interval_confidence: float | None = None  # that interval's coverage (`median_interval`)


def _elapsed(run: Any, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def _one_image(pipe: DiffusionPipeline, kwargs: dict[str, Any]) -> Callable[[], None]:
    def one_image() -> None:
        pipe(
            prompt=["a photograph"],
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="pil",
            **kwargs,
        )

    return one_image


def measure_efficiency(
    pipe: DiffusionPipeline, model: ModelAdapter, repeats: int = 6, warmup: int = 1
) -> Efficiency:
    """Parameters, TFLOPs per denoiser forward (per sample), seconds per forward and per image
    (the median of `repeats` one-image generations at the model's settings, with its interval
    and every time)."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    denoiser = model.denoiser(pipe)
    device = next(denoiser.parameters()).device
    kwargs = model.call_kwargs()
    steps = kwargs["num_inference_steps"]
    forwards = {"count": 0}

    def count(module: Any, args: Any, kw: Any) -> None:
        forwards["count"] += 1

    one_image = _one_image(pipe, kwargs)
    called = called_modules(denoiser)  # the modules the pipeline calls (each timestep expert)
    flops = pipeline_flops(pipe, called, kwargs)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        for _ in range(warmup):
            one_image()
        handles = [c.register_forward_pre_hook(count, with_kwargs=True) for c in called]
        try:
            times = [_elapsed(one_image, device) for _ in range(repeats)]
        finally:
            for handle in handles:
                handle.remove()
    per_image = statistics.median(times)
    interval = median_interval(times)
    calls_per_image = forwards["count"] / repeats
    return Efficiency(
        params=sum(p.numel() for p in denoiser.parameters()),
        tflops_per_forward=flops / 1e12,
        seconds_per_image=per_image,
        seconds_per_forward=per_image / calls_per_image,
        forwards_per_image=calls_per_image,
        num_inference_steps=steps,
        latency_device=str(device),
        image_seconds=times,
        seconds_per_image_interval=None if interval is None else [interval.low, interval.high],
        interval_confidence=None if interval is None else interval.confidence,
    )


@dataclass
class SpeedComparison:
    """Dense and pruned denoisers timed in one process, alternately, at the same settings.

    `speedup` is the median of the per-repeat ratios `dense_seconds[i] / pruned_seconds[i]` (not
    the ratio of the medians): each ratio compares two generations timed back to back. The
    intervals are `median_interval`s of the ratios and of each side's times, of coverage
    `interval_confidence`. Records from before the per-repeat times were kept read with none
    ([] and None) and a `speedup` that was the ratio of the medians."""

    dense_seconds_per_image: float  # medians of `repeats` one-image generations each
    pruned_seconds_per_image: float
    speedup: float  # median of the paired ratios dense / pruned
    repeats: int
    device: str
    speedup_interval: list[float] | None = None  # [low, high]
    dense_seconds_interval: list[float] | None = None
    pruned_seconds_interval: list[float] | None = None
    interval_confidence: float | None = None  # the intervals' coverage
    dense_seconds: list[float] = field(default_factory=list)  # per repeat, in the order timed
    pruned_seconds: list[float] = field(default_factory=list)

    @property
    def flags(self) -> list[str]:
        """`within noise`, `no interval`, a coverage below 95% (`speedup_flags`)."""
        return speedup_flags(self.speedup_interval, self.interval_confidence)

    def describe(self) -> str:
        """`1.283x [0.951, 1.612] (75% interval, within noise)`."""
        return format_speedup(self.speedup, self.speedup_interval, self.interval_confidence)


def speed_comparison(
    dense_seconds: Sequence[float], pruned_seconds: Sequence[float], device: str
) -> SpeedComparison:
    """The comparison of paired per-repeat times (repeat i of each timed back to back)."""
    if len(dense_seconds) != len(pruned_seconds) or not dense_seconds:
        raise ValueError(
            f"{len(dense_seconds)} dense and {len(pruned_seconds)} pruned times: give one pair "
            "per repeat, at least one"
        )
    ratios = [d / p for d, p in zip(dense_seconds, pruned_seconds, strict=True)]
    intervals = [median_interval(v) for v in (ratios, dense_seconds, pruned_seconds)]
    speedup, dense, pruned = (None if i is None else [i.low, i.high] for i in intervals)
    return SpeedComparison(
        dense_seconds_per_image=statistics.median(dense_seconds),
        pruned_seconds_per_image=statistics.median(pruned_seconds),
        speedup=statistics.median(ratios),
        repeats=len(ratios),
        device=device,
        speedup_interval=speedup,
        dense_seconds_interval=dense,
        pruned_seconds_interval=pruned,
        interval_confidence=None if intervals[0] is None else intervals[0].confidence,
        dense_seconds=list(dense_seconds),
        pruned_seconds=list(pruned_seconds),
    )


def compare_latency(
    pipe: DiffusionPipeline,
    model: ModelAdapter,
    dense_denoiser: nn.Module,
    repeats: int = 6,
    warmup: int = 1,
) -> SpeedComparison:
    """Time one-image generations of `pipe` with its own (pruned) denoiser and with
    `dense_denoiser` swapped in, after a warm-up of each: `repeats` pairs, the two of a pair
    back to back, so that both see the same machine load, and the first of a pair dense in
    even repeats and pruned in odd ones, so that an order effect (a cache or clock warmed by
    the first) cancels. The pipeline keeps its own denoiser afterwards."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    pruned = model.denoiser(pipe)
    device = next(pruned.parameters()).device
    one_image = _one_image(pipe, model.call_kwargs())
    times: dict[str, list[float]] = {"dense": [], "pruned": []}
    order = [("dense", dense_denoiser), ("pruned", pruned)]
    pipe.set_progress_bar_config(disable=True)
    try:
        with torch.inference_mode():
            for _, denoiser in order:
                model.set_denoiser(pipe, denoiser)
                for _ in range(warmup):
                    one_image()
            for repeat in range(repeats):
                for name, denoiser in order if repeat % 2 == 0 else order[::-1]:
                    model.set_denoiser(pipe, denoiser)
                    times[name].append(_elapsed(one_image, device))
    finally:
        model.set_denoiser(pipe, pruned)
    return speed_comparison(times["dense"], times["pruned"], str(device))
