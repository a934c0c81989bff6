"""Efficiency of a denoiser: parameters, TFLOPs and latency per forward and per image.

Latency is timed with CUDA events on a GPU and `perf_counter` on the CPU, after warm-up runs, at
the model's own sampling settings, so dense and pruned models are compared at the same settings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline

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

    def one_image() -> None:
        pipe(
            prompt=["a photograph"],
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="pil",
            **kwargs,
        )

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
