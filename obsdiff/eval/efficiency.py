"""Efficiency of a denoiser: parameters, TFLOPs and latency per forward and per image.

Latency is timed with CUDA events on a GPU and `perf_counter` on the CPU, after warm-up runs, at
the model's own sampling settings. A speed-up is only measured with both denoisers in one
process, alternately (`compare_latency`): latencies measured by different runs (a cached dense
evaluation, a loaded machine) do not compare.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline
from torch import nn

from obsdiff.models.base import ModelAdapter
from obsdiff.utils.flops import pipeline_flops


@dataclass
class Efficiency:
    """One pipeline's size, compute and latency at its own sampling settings."""

    params: int
    tflops_per_forward: float  # per sample
    seconds_per_image: float  # median of the timed one-image generations
    seconds_per_forward: float
    forwards_per_image: float
    num_inference_steps: int
    latency_device: str


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
    pipe: DiffusionPipeline, model: ModelAdapter, repeats: int = 3, warmup: int = 1
) -> Efficiency:
    """Parameters, TFLOPs per denoiser forward (per sample), seconds per forward and per image
    (median of `repeats` one-image generations at the model's settings)."""
    denoiser = model.denoiser(pipe)
    device = next(denoiser.parameters()).device
    kwargs = model.call_kwargs()
    steps = kwargs["num_inference_steps"]
    forwards = {"count": 0}

    def count(module: Any, args: Any, kw: Any) -> None:
        forwards["count"] += 1

    one_image = _one_image(pipe, kwargs)
    flops = pipeline_flops(pipe, denoiser, kwargs)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        for _ in range(warmup):
            one_image()
        handle = denoiser.register_forward_pre_hook(count, with_kwargs=True)
        try:
            times = sorted(_elapsed(one_image, device) for _ in range(repeats))
        finally:
            handle.remove()
    per_image = times[len(times) // 2]
    calls_per_image = forwards["count"] / repeats
    return Efficiency(
        params=sum(p.numel() for p in denoiser.parameters()),
        tflops_per_forward=flops / 1e12,
        seconds_per_image=per_image,
        seconds_per_forward=per_image / calls_per_image,
        forwards_per_image=calls_per_image,
        num_inference_steps=steps,
        latency_device=str(device),
    )


@dataclass
class SpeedComparison:
    """Dense and pruned denoisers timed in one process, alternately, at the same settings."""

    dense_seconds_per_image: float  # medians of `repeats` one-image generations each
    pruned_seconds_per_image: float
    speedup: float  # dense / pruned
    repeats: int
    device: str


def compare_latency(
    pipe: DiffusionPipeline,
    model: ModelAdapter,
    dense_denoiser: nn.Module,
    repeats: int = 3,
    warmup: int = 1,
) -> SpeedComparison:
    """Time one-image generations of `pipe` with its own (pruned) denoiser and with
    `dense_denoiser` swapped in, alternating image by image after a warm-up of each, so that
    both see the same machine load. The pipeline keeps its own denoiser afterwards."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    pruned = model.denoiser(pipe)
    device = next(pruned.parameters()).device
    one_image = _one_image(pipe, model.call_kwargs())
    times: dict[str, list[float]] = {"dense": [], "pruned": []}
    pipe.set_progress_bar_config(disable=True)
    try:
        with torch.inference_mode():
            for denoiser in (dense_denoiser, pruned):
                setattr(pipe, model.denoiser_attr, denoiser)
                for _ in range(warmup):
                    one_image()
            for _ in range(repeats):
                for name, denoiser in (("dense", dense_denoiser), ("pruned", pruned)):
                    setattr(pipe, model.denoiser_attr, denoiser)
                    times[name].append(_elapsed(one_image, device))
    finally:
        setattr(pipe, model.denoiser_attr, pruned)
    dense_s, pruned_s = (sorted(times[k])[repeats // 2] for k in ("dense", "pruned"))
    return SpeedComparison(dense_s, pruned_s, dense_s / pruned_s, repeats, str(device))
