"""FLOPs of one denoiser forward, counted with hooks on its linear and convolution layers."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def forward_flops(callers: list[nn.Module], run_once: Callable[[], Any]) -> float:
    """FLOPs (2 x multiply-adds) of the linear and convolution layers in the first forward of
    each denoiser in `callers` during `run_once()` (per sample), averaged over those it called:
    one denoiser's, or the mean step of a pipeline's timestep experts. Attention scores are not
    counted."""
    totals = {id(c): 0.0 for c in callers}
    calls = {id(c): 0 for c in callers}
    batch = {id(c): 1 for c in callers}
    running: list[int | None] = [None]  # the caller in its first forward

    def count(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        key = running[0]
        if key is None:
            return
        if isinstance(module, nn.Linear):
            totals[key] += 2.0 * module.in_features * output.numel()
        elif isinstance(module, nn.Conv2d | nn.Conv3d):
            kernel = math.prod(module.kernel_size)
            totals[key] += 2.0 * module.in_channels // module.groups * kernel * output.numel()

    def enter(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        key = id(module)
        calls[key] += 1
        running[0] = key if calls[key] == 1 else None
        if calls[key] == 1:
            first = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
            batch[key] = int(first.shape[0]) if first is not None else 1

    def leave(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        running[0] = None

    handles = [c.register_forward_pre_hook(enter, with_kwargs=True) for c in callers]
    handles += [c.register_forward_hook(leave) for c in callers]
    handles += [
        m.register_forward_hook(count)
        for c in callers
        for m in c.modules()
        if isinstance(m, nn.Linear | nn.Conv2d | nn.Conv3d)
    ]
    try:
        with torch.inference_mode():
            run_once()
    finally:
        for handle in handles:
            handle.remove()
    called = [key for key in totals if calls[key]]
    return sum(totals[key] / batch[key] for key in called) / max(len(called), 1)


def pipeline_flops(pipe: Any, callers: list[nn.Module], call_kwargs: dict[str, Any]) -> float:
    """FLOPs of the first denoiser forward (per sample) of a two-step, one-prompt pipeline call
    at `call_kwargs` (the model's sampling settings: resolution, guidance; one step would give
    Qwen-Image's scheduler no sigmas to stretch)."""
    two_steps = {**call_kwargs, "num_inference_steps": 2}
    return forward_flops(
        callers,
        lambda: pipe(
            prompt=["a photograph"],
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="latent",
            **two_steps,
        ),
    )
