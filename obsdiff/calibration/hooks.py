"""Hooks that feed calibration statistics, with the denoising step taken from the pipeline.

The step index comes from the pipeline's `callback_on_step_end` (never from raw timesteps: Flux
passes sigma in 0..1, SD3 a shifted 0..1000 scale). Each input group (linears reading one input
tensor) gets one forward pre-hook on its first linear, feeding one shared `InputStatistics`.
With classifier-free guidance the unconditional half can be excluded: the first half of a
doubled batch (SD3, SDXL) or the second denoiser call of a step (Flux true CFG).

Importance-weighted OBS (`importance`: the maps of `obsdiff.calibration.importance`): each token
row gets the weight of its position in the map of its prompt at the current step
(`obsdiff.calibration.token_maps`), the batch's prompts starting at `first_prompt`; both CFG
halves of a prompt (the doubled batch's, the two calls of a step) get its map, and a token
sample keeps the weights of the tokens it keeps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from obsdiff.calibration.token_maps import (
    AMBIGUOUS,
    UNMATCHED,
    ImportanceMaps,
    token_layout,
    token_weights,
)
from obsdiff.models.experts import called_modules
from obsdiff.models.sampling import CFG_DOUBLED_BATCH, CFG_MODES, CFG_NONE, CFG_SEPARATE_CALLS
from obsdiff.pruning.statistics import InputStatistics


log = logging.getLogger(__name__)


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
    group_weights: list[torch.Tensor] | None = None  # per group, in place of `weights` (experts)
    max_tokens: int | None = None  # per call and input group (`CalibrationSettings.max_tokens`)
    seed: int = 0  # of the token samples, with the call's number in the pass
    importance: ImportanceMaps | None = None  # token weights from these maps (None: unweighted)
    first_prompt: int = 0  # the prompt number of the running batch's first prompt (its maps')
    prompts: int = 0  # prompts in the running batch
    handles: list[RemovableHandle] = field(default_factory=list)
    calls: int = 0  # denoiser calls of this pass so far
    text_tokens: int | None = None  # of the running call (`encoder_hidden_states`)
    _weights: dict[tuple[int, int, int], torch.Tensor | None] = field(default_factory=dict)
    _warned: set[tuple[str, int, int | None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.cfg_mode not in CFG_MODES:
            raise ValueError(f"cfg_mode={self.cfg_mode!r}; use one of {CFG_MODES}")

    def batch(self, first_prompt: int, prompts: int) -> None:
        """The next pipeline call samples prompts first_prompt .. first_prompt + prompts - 1."""
        self.first_prompt, self.prompts = first_prompt, prompts

    def _feed(self, stats: InputStatistics, weights: torch.Tensor) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if not self.include_uncond:
                if self.cfg_mode == CFG_DOUBLED_BATCH:
                    x = x[x.shape[0] // 2 :]  # [uncond, cond]: keep the conditional half
                elif self.cfg_mode == CFG_SEPARATE_CALLS and self.tracker.call_in_step > 1:
                    return  # the second call of a step is the unconditional one
            step = min(self.tracker.step, len(weights) - 1)
            rows = None
            if self.importance is not None and x.dim() >= 3:
                rows = self.row_weights(x, step)  # (B, T) or None
            scale = 1.0
            if self.max_tokens is not None:
                kept, scale = token_positions(x, self.max_tokens, self.seed, self.calls)
                if kept is not None:
                    x = x.reshape(x.shape[0], -1, x.shape[-1])[:, kept.to(x.device)]
                    rows = None if rows is None else rows[:, kept.to(rows.device)]
            stats.update(x.detach(), float(weights[step]), token_scale=scale, token_weights=rows)

        return hook

    def row_weights(self, x: torch.Tensor, step: int) -> torch.Tensor | None:
        """The weights (B, T) of the token rows of x (B, ..., n), from the maps of the running
        batch's prompts at `step` (`token_maps.token_weights`), both CFG halves alike; None where
        they are uniform. Once per call and token count."""
        assert self.importance is not None
        if self.prompts < 1:
            raise RuntimeError("token weighting: name the running batch's prompts with batch()")
        tokens = math.prod(x.shape[1:-1])
        key = (self.calls, x.shape[0], tokens)
        if key not in self._weights:
            self._weights = {k: v for k, v in self._weights.items() if k[0] == self.calls}
            maps = self.importance.batch(self.first_prompt, self.prompts, step)  # (P, *grid)
            found = None
            if x.shape[0] % self.prompts == 0:  # P prompts, or [uncond, cond] of them
                found = token_weights(maps.to(x.device), tokens, self.text_tokens)  # (P, T)
            if found is not None:
                found = found.repeat(x.shape[0] // self.prompts, 1)  # (B, T)
            else:
                kind, _ = token_layout(tuple(maps.shape[1:]), tokens, self.text_tokens)
                warning = (kind, tokens, self.text_tokens)
                if kind in (AMBIGUOUS, UNMATCHED) and warning not in self._warned:
                    self._warned.add(warning)  # ambiguous: a text stream, or a UNet level
                    log.log(
                        logging.INFO if kind == AMBIGUOUS else logging.WARNING,
                        "token weighting: inputs of %d tokens a sample (text: %s, map grid %s) "
                        "match %s; weighted uniformly",
                        tokens,
                        self.text_tokens,
                        tuple(maps.shape[1:]),
                        "the text and an image grid alike" if kind == AMBIGUOUS else "no grid",
                    )
            self._weights[key] = found
        return self._weights[key]

    def _count_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.tracker.call_in_step += 1
        self.calls += 1
        text = kwargs.get("encoder_hidden_states")
        self.text_tokens = text.shape[-2] if isinstance(text, torch.Tensor) else None

    @contextmanager
    def attached(self) -> Iterator[None]:
        """Hooks on for the block; on exit every hook it added is gone (checked)."""
        before = count_hooks(self.denoiser)
        try:
            for called in called_modules(self.denoiser):  # each expert's calls count
                self.handles.append(
                    called.register_forward_pre_hook(self._count_call, with_kwargs=True)
                )
            weights = self.group_weights or [self.weights] * len(self.groups)
            for (module, stats), alphas in zip(self.groups, weights, strict=True):
                self.handles.append(module.register_forward_pre_hook(self._feed(stats, alphas)))
            yield
        finally:
            for handle in self.handles:
                handle.remove()
            self.handles.clear()
            remaining = count_hooks(self.denoiser) - before
            if remaining:
                raise RuntimeError(f"{remaining} calibration hooks are still attached")


def token_sample(
    x: torch.Tensor, max_tokens: int, seed: int, call: int
) -> tuple[torch.Tensor, float]:
    """At most `max_tokens` token rows of a linear's input x (B, ..., n): the same positions,
    drawn without replacement from a generator seeded by (seed, call), for each of the B samples
    (so a call's every input group sees the same tokens), and the tokens there were per token
    kept: `InputStatistics.update`'s `token_scale`, so that the sums estimate the whole call's
    without bias. An input of one token a sample (B, n), or within the cap, is x itself, 1."""
    kept, scale = token_positions(x, max_tokens, seed, call)
    if kept is None:
        return x, 1.0
    rows = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, n)
    return rows[:, kept.to(x.device)], scale


def token_positions(
    x: torch.Tensor, max_tokens: int, seed: int, call: int
) -> tuple[torch.Tensor | None, float]:
    """The token positions (k,) (sorted, on the CPU) that `token_sample` keeps of x
    (B, ..., n), and its `token_scale`; None, 1 where it keeps x whole."""
    if x.dim() < 3:
        return None, 1.0
    tokens = math.prod(x.shape[1:-1])
    per_sample = max(1, max_tokens // x.shape[0])
    if tokens <= per_sample:
        return None, 1.0
    generator = torch.Generator().manual_seed(seed * 1_000_003 + call)
    kept = torch.randperm(tokens, generator=generator)[:per_sample].sort().values
    return kept, tokens / per_sample


def count_hooks(module: nn.Module) -> int:
    """Forward (pre-)hooks attached anywhere in `module`."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())
