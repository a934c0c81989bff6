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

`attention`: the map of step t of a prompt is the attention each image position receives in
the dense denoiser's conditional call, averaged over its queries and heads (every query: the
image's own and, in joint attention, the text's), then over the attention layers whose keys hold
the image (self and joint attention; cross-attention's keys are the text), each layer's map
brought to the token grid (a UNet's coarser levels repeated 2 x 2) and given mean 1 first, so
that every layer counts alike. The probabilities are recomputed beside each attention call of
that pass (`recording_attention`: `torch.nn.functional.scaled_dot_product_attention`, which
diffusers' attention processors call, wrapped; queries in chunks, so one chunk's
probabilities are held at a time), as no fused kernel returns them. A joint attention's keys are
[text, image] (Flux, FLUX.2, Qwen-Image) or [image, text] (SD3): `ModelAdapter.joint_attention`.

From a map to a linear's tokens (`obsdiff.calibration.token_maps`): the map is stored at the
denoiser's token grid (`to_token_grid`), raster order, mean 1 a sample, and pooled there to the
grid a linear reads.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from obsdiff.calibration.hooks import StepTracker
from obsdiff.calibration.token_maps import ImportanceMaps, level_sizes, mean_one
from obsdiff.methods.obs_diff import ATTENTION, CFG_RESPONSE
from obsdiff.models.base import TEXT_FIRST, ModelAdapter, prediction
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


def attention_received(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """The attention each key receives, softmax(q k^T scale + mask) averaged over the queries
    and heads, in float32: (B, Lk), each row summing to 1. query (B, H, Lq, D), key
    (B, H_k, Lk, D) (grouped keys repeated; 3-D inputs are one head); `attn_mask`: boolean
    (True: attend) or additive, broadcastable to (B, H, Lq, Lk); queries `chunk` at a time."""
    if query.dim() == 3:
        query, key = query.unsqueeze(1), key.unsqueeze(1)
        attn_mask = None if attn_mask is None else attn_mask.unsqueeze(1)
    heads, keys = query.shape[1], key.shape[-2]
    if key.shape[1] != heads:
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    keys_t = key.float().transpose(-1, -2)  # (B, H, D, Lk)
    total = torch.zeros(query.shape[0], heads, keys, dtype=torch.float32, device=query.device)
    for start in range(0, query.shape[-2], chunk):
        logits = query[..., start : start + chunk, :].float() @ keys_t * scale  # (B, H, c, Lk)
        if attn_mask is not None:
            mask = (
                attn_mask if attn_mask.shape[-2] == 1 else attn_mask[..., start : start + chunk, :]
            )
            if mask.dtype == torch.bool:
                logits = logits.masked_fill(~mask, float("-inf"))
            else:
                logits = logits + mask.float()
        total += logits.softmax(-1).nan_to_num(0.0).sum(-2)  # (B, H, Lk)
    return total.mean(1) / query.shape[-2]  # (B, Lk)


@contextmanager
def recording_attention(received: list[torch.Tensor], on: Callable[[], bool]) -> Iterator[None]:
    """Within the block, each call of `torch.nn.functional.scaled_dot_product_attention` while
    `on()` also appends `attention_received` of its query and key to `received`; its output is
    the original function's."""
    original = F.scaled_dot_product_attention

    def recording(query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if on():
            mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
            received.append(attention_received(query, key, mask, kwargs.get("scale")))
        return original(query, key, *args, **kwargs)

    F.scaled_dot_product_attention = recording  # type: ignore[assignment]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original  # type: ignore[assignment]


def attention_map(
    received: list[torch.Tensor],
    grid: tuple[int, ...],
    text_tokens: int | None,
    text_first: bool,
) -> torch.Tensor | None:
    """The map (B, *grid) of one call from its layers' `attention_received` (B, Lk): the
    layers whose keys are a level of the token grid, or [text, level] ([level, text] unless
    `text_first`), each brought to the grid (a coarser level's positions repeated 2 x 2, cut to
    the grid) and scaled to mean 1, then averaged; None if no layer's keys hold the image."""
    sizes = level_sizes(grid)
    total, layers = None, 0
    for row in received:
        length = row.shape[1]
        if length in sizes:
            level, image = sizes.index(length), row
        elif text_tokens is not None and length - text_tokens in sizes:
            level = sizes.index(length - text_tokens)
            image = row[:, text_tokens:] if text_first else row[:, : length - text_tokens]
        else:  # cross-attention (the text's keys) or a layout of no level
            continue
        factor = 2**level
        height, width = grid[-2:]
        coarse = image.reshape(
            row.shape[0], *grid[:-2], -(-height // factor), -(-width // factor)
        )  # (B, [F,] h_l, w_l)
        fine = coarse.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
        fine = fine[..., :height, :width]  # (B, *grid)
        layer = mean_one(fine.flatten(1)).reshape(fine.shape)
        total = layer if total is None else total + layer
        layers += 1
    return None if total is None else total / layers


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
    """The `kind` maps (`cfg_response` or `attention`) of the calibration prompts
    (`embeddings`: this rank's batches, the first being prompt number `first_prompt`, image i
    from seed + i as in the package passes) from one dense sampling pass, at each of `steps`
    denoising steps.
    `unconditional`: `empty_conditioning` for each batch size, needed where the sampling runs
    no CFG (`ModelAdapter.cfg_mode`)."""
    if kind not in (CFG_RESPONSE, ATTENTION):
        raise ValueError(f"token weighting {kind!r} has no importance maps")
    started = time.perf_counter()
    denoiser = adapter.denoiser(pipe)
    cfg_mode = adapter.cfg_mode()
    if kind == CFG_RESPONSE and cfg_mode == CFG_NONE and unconditional is None:
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
    state.update(recording=False, text=None)  # attention: the call's, and its text length
    received: list[torch.Tensor] = []  # attention: each layer's of the running call

    def count_call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not state["busy"]:
            tracker.call_in_step += 1
            received.clear()  # the conditional call, or a doubled batch holding it
            state["recording"] = cfg_mode != CFG_SEPARATE_CALLS or tracker.call_in_step <= 1
            text = kwargs.get("encoder_hidden_states")
            state["text"] = text.shape[-2] if isinstance(text, torch.Tensor) else None

    def store(grid: torch.Tensor) -> None:
        flat = mean_one(grid.flatten(1)).reshape(grid.shape).cpu()  # (B, *grid)
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
        if kind == ATTENTION:
            if not state["recording"]:
                return
            state["recording"] = False
            half = predicted.shape[0] // 2 if cfg_mode == CFG_DOUBLED_BATCH else 0
            cond = predicted[half:]  # (B, ...): the conditional samples
            blank = to_token_grid(response_map(cond, cond, latent[half:]), module, packed)
            found = attention_map(
                [r[half:] for r in received], tuple(blank.shape[1:]), state["text"],
                adapter.joint_attention == TEXT_FIRST,
            )  # fmt: skip
            received.clear()
            if found is not None:
                store(found)
            return
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
        store(to_token_grid(response_map(cond, uncond, latent), module, packed))

    handles = []
    for called in called_modules(denoiser):
        handles.append(called.register_forward_pre_hook(count_call, with_kwargs=True))
        handles.append(called.register_forward_hook(on_output, with_kwargs=True))
    recording = recording_attention(received, lambda: bool(state["recording"]))
    try:
        with torch.inference_mode(), recording if kind == ATTENTION else nullcontext():
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
        " with the empty prompt's branch" if kind == CFG_RESPONSE and cfg_mode == CFG_NONE else "",
        result.seconds,
        result.nbytes() / 2**20,
    )
    return result


def _on(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda tensor: tensor.to(device)
