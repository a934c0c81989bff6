"""Importance maps of importance-weighted OBS (`ObsDiff.token_weighting`): which tokens of a
denoiser call matter, and the weight each token row of a linear's input gets in its Hessian.

`cfg_response`: the map of step t of a prompt is M_t = |eps(x_t, c) - eps(x_t, uncond)|, the
classifier-free-guidance response of the dense denoiser, averaged over the latent channels: one
value per token position of the image grid (per frame too for video). The map of step t exists
only once step t's denoiser call has returned, while the statistics hooks fire during that call,
so the maps are computed first, in one dense sampling pass over the calibration prompts before
any package is pruned (`importance_maps`), and kept on the CPU by (prompt, step). The
unconditional branch is the one the pipeline runs: the first half of a doubled batch, the second
call of a step (true CFG); where sampling runs no CFG (guidance-distilled Flux and FLUX.2,
guidance <= 1) the pass calls the denoiser once more per call with the empty prompt's
conditioning (`empty_conditioning`, as `obsdiff.models.training.text_call` captures it).

From a map to a linear's tokens (`obsdiff.calibration.token_maps`): the map is stored at the
denoiser's token grid (`to_token_grid`), raster order, mean 1 a sample, and pooled there to the
grid a linear reads.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from obsdiff.calibration.hooks import StepTracker
from obsdiff.calibration.token_maps import ImportanceMaps, mean_one
from obsdiff.methods.obs_diff import CFG_RESPONSE
from obsdiff.models.base import ModelAdapter, prediction
from obsdiff.models.experts import called_modules
from obsdiff.models.sampling import CFG_DOUBLED_BATCH, CFG_NONE, CFG_SEPARATE_CALLS
from obsdiff.models.training import text_call
from obsdiff.utils.nested import map_tensors
from obsdiff.utils.progress import progress
from obsdiff.utils.seeds import image_generators


if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


log = logging.getLogger(__name__)

Call = tuple[tuple[Any, ...], dict[str, Any]]


def empty_conditioning(
    adapter: ModelAdapter, pipe: DiffusionPipeline, counts: list[int]
) -> dict[int, Call]:
    """The empty prompt's denoiser call (`text_call`: the conditioning as the pipeline passes
    it, guidance off) for each batch size of `counts`, on the CPU: the unconditional branch of a
    sampling that runs none (computed while the text encoders are still on the device)."""
    return {count: text_call(adapter, pipe, [""] * count) for count in sorted(set(counts))}


def response_map(cond: torch.Tensor, uncond: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """|cond - uncond| averaged over the latent's channels: (B, L) for packed tokens (B, L, D),
    else (B, [F,] h, w) for (B, C, [F,] h, w) predictions. A prediction with more channels than
    the latent (PixArt's learned variance) counts the first ones, its noise prediction."""
    difference = (cond.float() - uncond.float()).abs()
    if cond.dim() == 3:  # (B, L, D): tokens of 2 x 2 patches (Flux, Qwen-Image, FLUX.2)
        return difference[..., : latent.shape[-1]].mean(-1)  # (B, L)
    return difference[:, : latent.shape[1]].mean(1)  # (B, [F,] h, w)


def to_token_grid(
    response: torch.Tensor, denoiser: nn.Module, packed_grid: tuple[int, int] | None
) -> torch.Tensor:
    """A `response_map` at the denoiser's token grid: packed tokens (B, L) as (B, h/2, w/2)
    where `packed_grid` tiles L (else left flat); a latent grid (B, [F,] h, w) pooled by the
    denoiser's spatial patch size (`config.patch_size`: SD3 and PixArt 2, Wan (1, 2, 2); none
    for a UNet) where it divides the grid."""
    if response.dim() == 2:
        if packed_grid is not None and math.prod(packed_grid) == response.shape[1]:
            return response.reshape(response.shape[0], *packed_grid)
        return response
    patch = getattr(getattr(denoiser, "config", None), "patch_size", None)
    size = int(patch[-1] if isinstance(patch, tuple | list) else patch or 1)
    h, w = response.shape[-2:]
    if size <= 1 or h % size or w % size:
        return response
    lead = response.shape[:-2]
    pooled = F.avg_pool2d(response.reshape(-1, 1, h, w), size)  # (B * F, 1, h / p, w / p)
    return pooled.reshape(*lead, h // size, w // size)


def _argument(slot: int | str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[slot] if isinstance(slot, int) else kwargs[slot]


def _unconditional_call(
    adapter: ModelAdapter, template: Call, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Call:
    """The empty prompt's call (`template`, on the call's device) with this call's latent and
    timestep, where the family's call carries them."""
    call_args, call_kwargs = list(template[0]), dict(template[1])
    for slot in (adapter.latent_argument, adapter.timestep_argument):
        value = _argument(slot, args, kwargs)
        if isinstance(slot, int):
            call_args[slot] = value
        else:
            call_kwargs[slot] = value
    return tuple(call_args), call_kwargs


def importance_maps(
    pipe: DiffusionPipeline,
    adapter: ModelAdapter,
    embeddings: list[dict[str, torch.Tensor]],
    steps: int,
    seed: int,
    first_prompt: int = 0,
    unconditional: dict[int, Call] | None = None,
    kind: str = CFG_RESPONSE,
) -> ImportanceMaps:
    """The `cfg_response` maps of the calibration prompts (`embeddings`: this rank's batches,
    the first being prompt number `first_prompt`, image i from seed + i as in the package
    passes) from one dense sampling pass, at each of `steps` denoising steps.
    `unconditional`: `empty_conditioning` for each batch size, needed where the sampling runs
    no CFG (`ModelAdapter.cfg_mode`)."""
    if kind != CFG_RESPONSE:
        raise ValueError(f"token weighting {kind!r} has no importance maps; use {CFG_RESPONSE}")
    started = time.perf_counter()
    denoiser = adapter.denoiser(pipe)
    cfg_mode = adapter.cfg_mode()
    if cfg_mode == CFG_NONE and unconditional is None:
        raise ValueError("a sampling without CFG needs the empty prompt's conditioning")
    device = next(denoiser.parameters()).device
    counts = [next(iter(batch.values())).shape[0] for batch in embeddings]
    total = sum(counts)
    height, width = adapter.latent_size(pipe.components)
    packed = (height // 2, width // 2)
    by_step: list[torch.Tensor | None] = [None] * steps
    filled = torch.zeros(total, steps, dtype=torch.bool)
    tracker = StepTracker()
    state: dict[str, Any] = {"busy": False, "pending": None, "offset": 0, "template": None}

    def count_call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not state["busy"]:
            tracker.call_in_step += 1

    def store(response: torch.Tensor, module: nn.Module) -> None:
        grid = to_token_grid(response, module, packed)  # (B, *grid)
        flat = mean_one(grid.flatten(1)).reshape(grid.shape).cpu()
        step = min(tracker.step, steps - 1)
        if by_step[step] is None:
            by_step[step] = torch.ones(total, *flat.shape[1:], dtype=torch.float32)
        maps = by_step[step]
        assert maps is not None
        start = state["offset"]
        maps[start : start + flat.shape[0]] = flat
        filled[start : start + flat.shape[0], step] = True

    def on_output(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if state["busy"]:
            return
        predicted = prediction(output)
        latent = _argument(adapter.latent_argument, args, kwargs)
        if cfg_mode == CFG_DOUBLED_BATCH:  # [uncond, cond]
            uncond, cond = predicted.chunk(2)
            latent = latent[: cond.shape[0]]
        elif cfg_mode == CFG_SEPARATE_CALLS:  # the conditional call first
            if tracker.call_in_step <= 1:
                state["pending"] = predicted.clone()
                return
            cond, uncond, state["pending"] = state["pending"], predicted, None
        else:  # no CFG: the empty prompt's branch, called here
            call_args, call_kwargs = _unconditional_call(adapter, state["template"], args, kwargs)
            state["busy"] = True
            try:
                uncond = prediction(module(*call_args, **call_kwargs))
            finally:
                state["busy"] = False
            cond = predicted
        store(response_map(cond, uncond, latent), module)

    handles = []
    for called in called_modules(denoiser):
        handles.append(called.register_forward_pre_hook(count_call, with_kwargs=True))
        handles.append(called.register_forward_hook(on_output, with_kwargs=True))
    try:
        with torch.inference_mode():
            for batch, count in progress(
                list(zip(embeddings, counts, strict=True)), "importance maps", "batch"
            ):
                if unconditional is not None and cfg_mode == CFG_NONE:
                    state["template"] = map_tensors(unconditional[count], _on(device))
                tracker.reset()
                generators = image_generators(seed, first_prompt + state["offset"], count)
                adapter.calibration_call(pipe, batch, generators, tracker.on_step_end)
                state["offset"] += count
    finally:
        for handle in handles:
            handle.remove()
    missing = int((~filled).sum())
    if missing:
        log.warning(
            "importance maps: %d of %d (prompt, step) pairs had no map; weighted uniformly",
            missing,
            filled.numel(),
        )
    maps = [m if m is not None else torch.ones(total, 1) for m in by_step]
    result = ImportanceMaps(maps, first_prompt, time.perf_counter() - started)
    log.info(
        "importance maps (%s): one dense pass over %d prompts%s, %.1f s, %.1f MiB",
        kind,
        total,
        " with the empty prompt's branch" if cfg_mode == CFG_NONE else "",
        result.seconds,
        result.nbytes() / 2**20,
    )
    return result


def _on(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda tensor: tensor.to(device)
