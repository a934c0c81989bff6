"""Real images as the recovery's data (`recover.images`): an image-text folder
(`obsdiff.prompts.image_folder`: images with their captions), encoded once.

Each image is resized (shorter side) and centre cropped to the model's sampling resolution and
encoded once by the VAE (the mode of its latent distribution, normalised as the pipeline does:
minus the shift factor, times the scaling factor); each caption's conditioning is taken once
from the pipeline itself (`obsdiff.models.training.text_call`). A training draw picks images, a
noise level with the model's training density and a noise, drops captions to the empty one with
`caption_dropout`, and noises the latents into the denoiser's call (`noised_call`), with the
target of the model's own training loss; every draw is a function of the seed and its index
alone, so a resumed recovery draws the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from obsdiff.models.base import ModelAdapter
from obsdiff.models.training import (
    is_flow_matching,
    noised_call,
    text_call,
    training_schedule,
)
from obsdiff.prompts.image_folder import pixels
from obsdiff.recovery.data import DenoiserCall
from obsdiff.utils.nested import map_tensors, tensors_in
from obsdiff.utils.progress import progress


if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

Call = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class ImageSet:
    """The encoded folder: every image's latent and conditioning, and the empty caption's."""

    latents: torch.Tensor  # (N, C, h, w), float32, CPU
    conditions: list[Call]  # each image's text call (batch 1), CPU
    unconditional: Call  # the empty caption's
    schedule: Any  # the model's training scheduler (`training_schedule`)

    def draw(
        self,
        adapter: ModelAdapter,
        index: int,
        batch: int,
        seed: int,
        caption_dropout: float,
    ) -> DenoiserCall:
        """Training draw `index`: `batch` images, levels, noise and dropped captions from a
        generator seeded by (seed, index) alone; the call with its training target."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        chosen = torch.randint(len(self.conditions), (batch,), generator=generator)
        if is_flow_matching(
            self.schedule
        ):  # logit-normal (mean 0, std 1), as diffusers' training scripts
            u = torch.sigmoid(torch.randn(batch, generator=generator))
        else:
            u = torch.rand(batch, generator=generator)
        latents = self.latents[chosen]
        noise = torch.randn(latents.shape, generator=generator)
        dropped = torch.rand(batch, generator=generator) < caption_dropout
        texts = [
            self.unconditional if drop else self.conditions[i]
            for i, drop in zip(chosen.tolist(), dropped.tolist(), strict=True)
        ]
        dtype = adapter.torch_dtype
        (args, kwargs), target = noised_call(
            adapter, self.schedule, stacked(texts), latents.to(dtype), noise.to(dtype), u
        )
        return DenoiserCall(args, kwargs, step=-1, target=target)


def encode_images(
    adapter: ModelAdapter,
    pipe: DiffusionPipeline,
    pairs: list[tuple[Path, str]],
    batch: int,
    device: torch.device,
) -> ImageSet:
    """Every image through the VAE and every caption through the pipeline, once."""
    sampling = adapter.sampling
    vae = pipe.vae
    latents, conditions = [], []
    with torch.no_grad():
        for first in progress(range(0, len(pairs), batch), "images", "batch"):
            chunk = pairs[first : first + batch]
            images = torch.stack([pixels(p, sampling.height, sampling.width) for p, _ in chunk])
            encoded = adapter.encode_latents(vae, images.to(device, vae.dtype))
            latents.append(encoded.float().cpu())
            conditions += split(text_call(adapter, pipe, [c for _, c in chunk]), len(chunk))
        unconditional = text_call(adapter, pipe, [""])
    return ImageSet(torch.cat(latents), conditions, unconditional, training_schedule(pipe))


def split(call: Call, count: int) -> list[Call]:
    """A call of `count` samples as `count` calls of one (tensors of `count` rows sliced; the
    others, e.g. Flux's position ids, shared)."""
    return [
        map_tensors(call, lambda t, i=i: t[i : i + 1] if _batched(t, count) else t)  # type: ignore[misc]
        for i in range(count)
    ]


def stacked(calls: list[Call]) -> Call:
    """Calls of one sample each as one call of all (`split`'s inverse)."""
    columns = zip(*(list(tensors_in(call)) for call in calls), strict=True)
    merged = iter([torch.cat(c) if _batched(c[0], 1) else c[0] for c in columns])
    return map_tensors(calls[0], lambda _: next(merged))  # type: ignore[no-any-return]


def _batched(tensor: torch.Tensor, count: int) -> bool:
    return tensor.dim() > 0 and tensor.shape[0] == count
