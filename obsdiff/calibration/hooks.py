"""Hooks that feed calibration statistics, with the denoising step taken from the pipeline.

The step index comes from the pipeline's `callback_on_step_end` (never from raw timesteps: Flux
passes sigma in 0..1, SD3 a shifted 0..1000 scale). Each input group (linears reading one input
tensor) gets one forward pre-hook on its first linear, feeding one shared `InputStatistics`.
With classifier-free guidance the unconditional half can be excluded: the first half of a
doubled batch (SD3, SDXL) or the second denoiser call of a step (Flux true CFG).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from obsdiff.models.sampling import CFG_DOUBLED_BATCH, CFG_MODES, CFG_NONE, CFG_SEPARATE_CALLS
from obsdiff.pruning.statistics import InputStatistics


@dataclass
class StepTracker:
    """Current step of the running pipeline call and the denoiser calls made within it."""

    step: int = 0
    call_in_step: int = 0

    def reset(self) -> None:
        self.step = 0
        self.call_in_step = 0

    def on_step_end(
        self, pipe: Any, i: int, t: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """The pipelines' `callback_on_step_end`: step i is done."""
        self.step = i + 1
        self.call_in_step = 0
        return callback_kwargs


@dataclass
class StatisticsHooks:
    """Owns every hook of one calibration pass; `attached()` removes them all on exit."""

    denoiser: nn.Module
    groups: list[tuple[nn.Linear, InputStatistics]]
    weights: torch.Tensor  # alpha_t per step, float64 (T,)
    tracker: StepTracker
    cfg_mode: str = CFG_NONE
    include_uncond: bool = True
    handles: list[RemovableHandle] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.cfg_mode not in CFG_MODES:
            raise ValueError(f"cfg_mode={self.cfg_mode!r}; use one of {CFG_MODES}")

    def _feed(self, stats: InputStatistics) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if not self.include_uncond:
                if self.cfg_mode == CFG_DOUBLED_BATCH:
                    x = x[x.shape[0] // 2 :]  # [uncond, cond]: keep the conditional half
                elif self.cfg_mode == CFG_SEPARATE_CALLS and self.tracker.call_in_step > 1:
                    return  # the second call of a step is the unconditional one
            step = min(self.tracker.step, len(self.weights) - 1)
            stats.update(x.detach(), float(self.weights[step]))

        return hook

    def _count_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.tracker.call_in_step += 1

    @contextmanager
    def attached(self) -> Iterator[None]:
        """Hooks on for the block; on exit every hook it added is gone (checked)."""
        before = count_hooks(self.denoiser)
        try:
            self.handles.append(
                self.denoiser.register_forward_pre_hook(self._count_call, with_kwargs=True)
            )
            for module, stats in self.groups:
                self.handles.append(module.register_forward_pre_hook(self._feed(stats)))
            yield
        finally:
            for handle in self.handles:
                handle.remove()
            self.handles.clear()
            remaining = count_hooks(self.denoiser) - before
            if remaining:
                raise RuntimeError(f"{remaining} calibration hooks are still attached")


def count_hooks(module: nn.Module) -> int:
    """Forward (pre-)hooks attached anywhere in `module`."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())
