"""The generation runner: one PNG per evaluation prompt, sharded over ranks, resumable.

Image of prompt id i uses the noise of seed + i (a CPU generator), so every method and every
device sees the same noise for the same prompt. Each rank renders its exact share of the ids
(no duplicates, no padding); existing images are skipped, so an interrupted run continues.
`manifest.json` lists (id, prompt, seed, file) for the whole set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from obsdiff.eval.prompt_sets import EvalPrompts
from obsdiff.models.base import ModelAdapter
from obsdiff.runners.parallel import DataParallel
from obsdiff.utils.io import write_json
from obsdiff.utils.progress import progress
from obsdiff.utils.seeds import generators_for


IMAGES = "images"
MANIFEST = "manifest.json"


def image_file(prompt_id: int) -> str:
    return f"{IMAGES}/{prompt_id:07d}.png"


def generate_images(
    pipe: DiffusionPipeline,
    model: ModelAdapter,
    prompts: EvalPrompts,
    out_dir: Path,
    seed: int = 0,
    batch_size: int = 4,
    parallel: DataParallel | None = None,
) -> list[dict[str, Any]]:
    """Render this rank's missing images into `out_dir/images/`; return the full manifest."""
    parallel = parallel or DataParallel()
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    (out_dir / IMAGES).mkdir(parents=True, exist_ok=True)
    if parallel.is_main:
        for partial in (out_dir / IMAGES).glob("*.tmp.png"):  # left by an interrupted run
            partial.unlink(missing_ok=True)
    parallel.barrier()
    manifest: list[dict[str, Any]] = [
        {"id": i, "prompt": p, "seed": seed + i, "file": image_file(i)}
        for i, p in zip(prompts.ids, prompts.prompts, strict=True)
    ]
    mine = [manifest[k] for k in parallel.shard(len(manifest))]
    todo = [entry for entry in mine if not (out_dir / entry["file"]).is_file()]
    pipe.set_progress_bar_config(disable=True)
    starts = range(0, len(todo), batch_size)
    for start in progress(
        starts, f"generating (rank {parallel.rank})", "batch", enabled=bool(starts)
    ):
        batch = todo[start : start + batch_size]
        with torch.inference_mode():
            images = pipe(
                prompt=[entry["prompt"] for entry in batch],
                generator=generators_for(seed, [entry["id"] for entry in batch]),
                output_type="pil",
                **model.call_kwargs(),
            ).images
        for entry, image in zip(batch, images, strict=True):
            target = out_dir / entry["file"]
            partial = target.with_suffix(".tmp.png")
            image.save(partial)
            os.replace(partial, target)  # a crash never leaves half an image
    parallel.barrier()
    if parallel.is_main:
        write_json(out_dir / MANIFEST, {"prompts": prompts.describe(), "images": manifest})
    return manifest
