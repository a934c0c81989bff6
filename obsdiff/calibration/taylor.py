"""Diff-Pruning's Taylor pass on a pipeline: the loss `obsdiff.pruning.taylor.taylor_scores`
walks. The clean latents of the model's own training loss are the dense model's samples of the
calibration prompts, encoded by its VAE (`dense_samples`: data-free, as the recovery's inputs),
or the images of an image-text folder with their captions (`folder_samples`),
noised with one fixed noise at every level, as the official code noises its one batch of clean
images; the levels run from the low-noise end (`level_fraction`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from obsdiff.models.base import ModelAdapter, prediction
from obsdiff.models.training import (
    is_flow_matching,
    noised_call,
    text_call,
    training_schedule,
    training_timestep,
)
from obsdiff.prompts.image_folder import pixels
from obsdiff.pruning.taylor import OFFICIAL_LEVELS
from obsdiff.utils.nested import map_tensors
from obsdiff.utils.seeds import image_generators


if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


def level_fraction(schedule: Any, level: int, levels: int) -> float:
    """The training level `level` of `levels`, counted from the low-noise end, as the fraction
    u in [0, 1) that `noised_call` takes: DDPM's t = u x 1000 grows with u (t = 0, 1, ... as
    the official loop), flow matching's sigma falls with it (its timesteps run from sigma 1)."""
    fraction = (level + 0.5) / levels
    return 1.0 - fraction if is_flow_matching(schedule) else level / levels


def dense_samples(
    adapter: ModelAdapter, pipe: DiffusionPipeline, prompts: list[str], seed: int
) -> tuple[tuple[tuple[Any, ...], dict[str, Any]], torch.Tensor]:
    """The prompts' conditioning as the pipeline passes it (`text_call`, guidance off) and the
    clean latents of the training loss: the dense pipeline's own images (a video family's
    videos) of the prompts, image i from seed + i, encoded by its VAE
    (`ModelAdapter.encode_latents`)."""
    generators = image_generators(seed, 0, len(prompts))
    with torch.no_grad():
        out = pipe(prompt=prompts, generator=generators, output_type="pt", **adapter.call_kwargs())
        if adapter.video:  # (B, F, 3, H, W) frames as (B, 3, F, H, W) videos
            images = out.frames.permute(0, 2, 1, 3, 4)
        else:
            images = out.images  # (B, 3, H, W)
        images = images.to(pipe.vae.device, pipe.vae.dtype) * 2 - 1  # in [-1, 1]
        latents = adapter.encode_latents(pipe.vae, images)
    return text_call(adapter, pipe, prompts), latents


def folder_samples(
    adapter: ModelAdapter, pipe: DiffusionPipeline, pairs: list[tuple[Path, str]]
) -> tuple[tuple[tuple[Any, ...], dict[str, Any]], torch.Tensor]:
    """As `dense_samples`, from real images and their captions (an image-text folder's pairs,
    `obsdiff.prompts.image_folder`): each image resized and centre cropped to the sampling
    resolution, encoded by the VAE; the captions' conditioning."""
    sampling = adapter.sampling
    images = torch.stack([pixels(path, sampling.height, sampling.width) for path, _ in pairs])
    with torch.no_grad():
        latents = adapter.encode_latents(pipe.vae, images.to(pipe.vae.device, pipe.vae.dtype))
    return text_call(adapter, pipe, [caption for _, caption in pairs]), latents


def training_loss(
    adapter: ModelAdapter,
    pipe: DiffusionPipeline,
    prompts: list[str],
    levels: int = OFFICIAL_LEVELS,
    seed: int = 0,
    images: list[tuple[Path, str]] | None = None,
) -> Callable[[int], torch.Tensor]:
    """`loss_at(level)` for `taylor_scores`: the denoiser's own training loss (velocity MSE for
    flow matching, noise or velocity MSE otherwise) on `dense_samples` of `prompts` (or, with
    `images`, those (image, caption) pairs: `folder_samples`) noised by one fixed noise at
    training level `level` of `levels` from the low-noise end, every sample at once; of
    timestep experts, the one the pipeline calls at that level's timestep."""
    schedule = training_schedule(pipe)
    if images:
        template, latents = folder_samples(adapter, pipe, images)
    else:
        template, latents = dense_samples(adapter, pipe, prompts, seed)
    count = latents.shape[0]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    device = next(adapter.denoiser(pipe).parameters()).device

    def loss_at(level: int) -> torch.Tensor:
        u = torch.full((count,), level_fraction(schedule, level, levels))
        (args, kwargs), target = noised_call(adapter, schedule, template, latents, noise, u)
        args, kwargs = map_tensors((args, kwargs), lambda t: t.to(device))
        denoiser = adapter.denoiser_at(pipe, float(training_timestep(schedule, u)[0]))
        output = prediction(denoiser(*args, **kwargs)).float()
        truth = target.to(device).float()
        if output.shape[1] == 2 * truth.shape[1]:  # a learned variance (PixArt): the mean half
            output = output[:, : truth.shape[1]]
        return nn.functional.mse_loss(output, truth)

    return loss_at
