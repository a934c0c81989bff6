"""The one generation loop: image i of a prompt list from the noise of seed + i.

Every image gets a CPU generator seeded with `seed + id` whatever the batch size or device, so
two models generated with the same seed and prompts compare image for image. `generate` returns
the images (or latents) of a prompt list; `generate_images` renders an evaluation set into
`<out_dir>/images/` (sharded over ranks, resumable: images already there are skipped) with an
`images.json`; `sample_to_dir` is the sample app's job (PNGs, grid, `samples.json`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from obsdiff.eval.dense_relative import LATENTS_KEY
from obsdiff.models.base import ModelAdapter
from obsdiff.models.sampling import SamplingDefaults
from obsdiff.prompts.eval_sets import EvalPrompts
from obsdiff.runners.parallel import DataParallel
from obsdiff.utils.images import (
    image_name,
    make_grid,
    remove_partial,
    save_image,
    save_video,
    video_name,
)
from obsdiff.utils.io import save_tensors, write_json
from obsdiff.utils.progress import progress
from obsdiff.utils.seeds import generators_for


log = logging.getLogger(__name__)

IMAGES = "images"
IMAGES_LIST = "images.json"  # (id, prompt, seed, file) of every image of the set
LATENTS = "latents"  # the final latents of each image (dense-relative metrics)


def image_file(prompt_id: int, video: bool = False) -> str:
    """An evaluation image's path relative to its evaluation directory (a video's: its animated
    preview, its frames in the folder of the same name)."""
    return f"{IMAGES}/{video_name(prompt_id) if video else image_name(prompt_id)}"


def frame_files(file: Path, frames: int) -> list[Path]:
    """The frames of the video whose preview is `file` (`save_video`'s layout)."""
    return [file.with_suffix("") / f"{index:04d}.png" for index in range(frames)]


def latents_file(image: str) -> str:
    """The final latents of evaluation image `image` (its `image_file`), relative likewise."""
    return f"{LATENTS}/{Path(image).stem}.safetensors"


def render(
    pipe: DiffusionPipeline,
    model: ModelAdapter,
    prompts: list[str],
    ids: list[int],
    seed: int,
    output_type: str = "pil",
    final_latents: list[torch.Tensor] | None = None,
    sampling: SamplingDefaults | None = None,
) -> list[Any]:
    """One pipeline call: image `ids[k]` of `prompts[k]` from the noise of seed + ids[k].
    `final_latents`, when given, receives each image's latents after the last denoising step
    (before the VAE; the pipeline's own layout, e.g. packed for Flux). `sampling`: other
    settings than the model's (steps, guidance)."""
    kwargs: dict[str, Any] = {}
    if final_latents is not None:
        last: dict[str, torch.Tensor] = {}

        def keep_latents(
            pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            last["latents"] = tensors["latents"]
            return tensors

        kwargs = model.step_callback(pipe, keep_latents, latents=True)
    with torch.inference_mode():
        result = pipe(
            prompt=prompts,
            generator=generators_for(seed, ids),
            output_type=output_type,
            **model.call_kwargs(sampling),
            **kwargs,
        )
    if final_latents is not None:
        final_latents.extend(last["latents"].detach().to("cpu").clone().unbind(0))
    return list(model.outputs(result))


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")


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
    _check_batch_size(batch_size)
    outputs: list[Any] = []
    starts = range(0, len(prompts), batch_size)
    for start in progress(starts, f"{model.name}: batches", "batch", enabled=len(starts) > 1):
        batch = prompts[start : start + batch_size]
        ids = list(range(start, start + len(batch)))
        outputs.extend(render(pipe, model, batch, ids, seed, output_type))
    return outputs


def generate_images(
    pipe: DiffusionPipeline,
    model: ModelAdapter,
    prompts: EvalPrompts,
    out_dir: Path,
    seed: int = 0,
    batch_size: int = 4,
    parallel: DataParallel | None = None,
    save_latents: bool = False,
    sampling: SamplingDefaults | None = None,
) -> list[dict[str, Any]]:
    """Render this rank's missing images into `out_dir/images/` (and, with `save_latents`, their
    final latents into `out_dir/latents/`); return the full manifest. A video model's entries
    are its videos (`file`: the animated preview, `frames`: how many beside it).

    Each rank renders its exact share of the ids (no duplicates, no padding); `images.json`
    lists (id, prompt, seed, file) for the whole set."""
    parallel = parallel or DataParallel()
    _check_batch_size(batch_size)
    (out_dir / IMAGES).mkdir(parents=True, exist_ok=True)
    if save_latents:
        (out_dir / LATENTS).mkdir(exist_ok=True)
    if parallel.is_main:
        remove_partial(out_dir / IMAGES)  # left by an interrupted run
    parallel.barrier()
    frames = {"frames": (sampling or model.sampling).num_frames} if model.video else {}
    manifest: list[dict[str, Any]] = [
        {"id": i, "prompt": p, "seed": seed + i, "file": image_file(i, model.video), **frames}
        for i, p in zip(prompts.ids, prompts.prompts, strict=True)
    ]
    mine = [manifest[k] for k in parallel.shard(len(manifest))]

    def done(entry: dict[str, Any]) -> bool:
        image = (out_dir / entry["file"]).is_file()
        return image and (not save_latents or (out_dir / latents_file(entry["file"])).is_file())

    todo = [entry for entry in mine if not done(entry)]
    pipe.set_progress_bar_config(disable=True)
    starts = range(0, len(todo), batch_size)
    for start in progress(
        starts, f"generating (rank {parallel.rank})", "batch", enabled=bool(starts)
    ):
        batch = todo[start : start + batch_size]
        latents: list[torch.Tensor] | None = [] if save_latents else None
        texts, ids = [e["prompt"] for e in batch], [e["id"] for e in batch]
        images = render(pipe, model, texts, ids, seed, final_latents=latents, sampling=sampling)
        for k, (entry, image) in enumerate(zip(batch, images, strict=True)):
            if latents is not None:  # first: an image on disk means its latents are too
                save_tensors(out_dir / latents_file(entry["file"]), {LATENTS_KEY: latents[k]})
            if model.video:  # the frames, then the preview: a preview means every frame
                save_video(image, out_dir / entry["file"], model.fps)
            else:
                save_image(image, out_dir / entry["file"])  # a crash never leaves half an image
    parallel.barrier()
    if parallel.is_main:
        write_json(out_dir / IMAGES_LIST, {"prompts": prompts.describe(), "images": manifest})
    return manifest


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
    """Load `model`, generate one image per prompt (a video model: one video, its frames and an
    animated preview), write them, `grid.png` and `samples.json`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pipe = model.load().to(device)
    loaded = time.perf_counter()
    pipe.set_progress_bar_config(disable=True)  # one bar: the batches
    images: list[Any] = generate(pipe, model, prompts, seed, batch_size)  # a video: frames
    generated = time.perf_counter()

    manifest = []
    for i, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
        if model.video:  # its frames, and an animated preview
            save_video(image, out_dir / video_name(i), model.fps)
            entry = {"file": video_name(i), "frames": len(image)}
        else:
            save_image(image, out_dir / image_name(i))
            entry = {"file": image_name(i)}
        manifest.append({"id": i, "prompt": prompt, "seed": seed + i, **entry})
    firsts = [video[0] for video in images] if model.video else images  # a video's first frame
    make_grid(firsts).save(out_dir / "grid.png")

    record = SampleRecord(
        model=model.describe(),
        device=str(device),
        seed=seed,
        load_seconds=round(loaded - started, 4),
        generate_seconds=round(generated - loaded, 4),
        denoiser_parameters=sum(p.numel() for p in model.denoiser(pipe).parameters()),
        images=manifest,
    )
    write_json(out_dir / "samples.json", asdict(record))
    log.info(
        "%s: %d %s in %.2f s (load %.2f s) -> %s",
        model.name,
        len(images),
        "videos" if model.video else "images",
        record.generate_seconds,
        record.load_seconds,
        out_dir,
    )
    return record
