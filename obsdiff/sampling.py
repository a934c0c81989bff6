"""Generate images from a model config: per-image seeds, batching, PNGs, a grid and a record.

Image i of a prompt list always gets the noise of seed + i (CPU generators, so CPU and GPU runs
start from the same noise), whatever the batch size: two models sampled with the same seed and
prompts are compared image for image.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from obsdiff.models.base import ModelAdapter
from obsdiff.utils.images import make_grid
from obsdiff.utils.progress import progress
from obsdiff.utils.seeds import image_generators


log = logging.getLogger(__name__)


def generate(
    pipe: DiffusionPipeline,
    model: ModelAdapter,
    prompts: list[str],
    seed: int,
    batch_size: int,
    output_type: str = "pil",
) -> list[Any]:
    """Images (PIL) or latents (one tensor per prompt) for `prompts`, in order."""
    if not prompts:
        raise ValueError("no prompts to generate")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    outputs: list[Any] = []
    starts = range(0, len(prompts), batch_size)
    for start in progress(starts, f"{model.name}: batches", "batch", enabled=len(starts) > 1):
        batch = prompts[start : start + batch_size]
        with torch.inference_mode():
            result = pipe(
                prompt=batch,
                generator=image_generators(seed, start, len(batch)),
                output_type=output_type,
                **model.call_kwargs(),
            )
        outputs.extend(result.images)
    return outputs


@dataclass
class SampleRecord:
    """What a sampling run did, written to `samples.json`."""

    model: dict[str, Any]
    device: str
    seed: int
    load_seconds: float
    generate_seconds: float
    denoiser_parameters: int
    images: list[dict[str, Any]]


def sample_to_dir(
    model: ModelAdapter,
    prompts: list[str],
    seed: int,
    batch_size: int,
    device: torch.device,
    out_dir: Path,
) -> SampleRecord:
    """Load `model`, generate one image per prompt, write PNGs, `grid.png` and `samples.json`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pipe = model.load().to(device)
    loaded = time.perf_counter()
    pipe.set_progress_bar_config(disable=True)  # one bar: the batches
    images: list[Image.Image] = generate(pipe, model, prompts, seed, batch_size)
    generated = time.perf_counter()

    manifest = []
    for i, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
        file = f"{i:05d}.png"
        image.save(out_dir / file)
        manifest.append({"id": i, "prompt": prompt, "seed": seed + i, "file": file})
    make_grid(images).save(out_dir / "grid.png")

    record = SampleRecord(
        model=model.describe(),
        device=str(device),
        seed=seed,
        load_seconds=round(loaded - started, 4),
        generate_seconds=round(generated - loaded, 4),
        denoiser_parameters=sum(p.numel() for p in model.denoiser(pipe).parameters()),
        images=manifest,
    )
    (out_dir / "samples.json").write_text(json.dumps(record.__dict__, indent=2) + "\n")
    log.info(
        "%s: %d images in %.2f s (load %.2f s) -> %s",
        model.name,
        len(images),
        record.generate_seconds,
        record.load_seconds,
        out_dir,
    )
    return record
