"""FLOPs of one denoiser forward, counted with hooks on its linear and convolution layers."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def forward_flops(denoiser: nn.Module, run_once: Callable[[], Any]) -> float:
    """FLOPs (2 x multiply-adds) of the linear and convolution layers in the denoiser's first
    forward during `run_once()`, per sample. Attention scores are not counted."""
    total = [0.0]
    state = {"calls": 0, "batch": 1}

    def count(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        if state["calls"] != 1:
            return
        if isinstance(module, nn.Linear):
            total[0] += 2.0 * module.in_features * output.numel()
        elif isinstance(module, nn.Conv2d | nn.Conv3d):
            kernel = math.prod(module.kernel_size)
            total[0] += 2.0 * module.in_channels // module.groups * kernel * output.numel()

    def enter(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        state["calls"] += 1
        if state["calls"] == 1:
            first = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
            state["batch"] = int(first.shape[0]) if first is not None else 1

    handles = [denoiser.register_forward_pre_hook(enter, with_kwargs=True)]
    handles += [
        m.register_forward_hook(count)
        for m in denoiser.modules()
        if isinstance(m, nn.Linear | nn.Conv2d | nn.Conv3d)
    ]
    try:
        with torch.inference_mode():
            run_once()
    finally:
        for handle in handles:
            handle.remove()
    return total[0] / state["batch"]


def pipeline_flops(pipe: Any, denoiser: nn.Module, call_kwargs: dict[str, Any]) -> float:
    """FLOPs of the first denoiser forward (per sample) of a two-step, one-prompt pipeline call
    at `call_kwargs` (the model's sampling settings: resolution, guidance; one step would give
    Qwen-Image's scheduler no sigmas to stretch)."""
    two_steps = {**call_kwargs, "num_inference_steps": 2}
    return forward_flops(
        denoiser,
        lambda: pipe(
            prompt=["a photograph"],
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="latent",
            **two_steps,
        ),
    )
