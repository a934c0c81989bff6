"""An evaluation: generate the prompt set's images, then score them (FID, CLIP, ImageReward,
efficiency); the dense model's evaluation is cached and shared by every run of a sweep.

`EvalSettings` holds typed objects built once by the apps from the `eval` config group;
`evaluate_pipeline` evaluates one pipeline into a directory (resumable: images already there
are kept), `evaluate_dense` does so for the unpruned model under a cache key.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers import DiffusionPipeline
from PIL import Image
from torch import nn

from obsdiff.eval.efficiency import Efficiency, measure_efficiency
from obsdiff.eval.fid import FID
from obsdiff.eval.generation import IMAGES, generate_images
from obsdiff.models.base import ModelAdapter
from obsdiff.prompts.eval_sets import EvalPrompts
from obsdiff.runners.parallel import DataParallel
from obsdiff.utils.images import make_grid
from obsdiff.utils.io import write_json


log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
GRID_FILE = "grid.png"
DENSE_REFERENCE = "dense"


@dataclass
class Evaluation:
    """One model's evaluation on one prompt set: `eval/metrics.json`, and the `eval` and `dense`
    sections of a run record. `metrics` holds the scores (fid, clip_score, ...) with what they
    were measured with (fid_reference, clip_model, ...); `efficiency` the size and latency."""

    set: str
    prompts: dict[str, Any]  # the prompt set's description (source, hashes, count)
    num_images: int
    seed: int
    images_dir: str
    grid: str
    generation_seconds: float
    metrics_key: str  # hash of the metric settings: a cached evaluation is reused only if equal
    grid_prompts: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    efficiency: Efficiency | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Evaluation:
        """From `as_dict`, or from the flat record of earlier versions (scores and efficiency beside
        the other keys), so that older dense caches and run directories still read."""
        if "metrics" in data and isinstance(data["metrics"], dict):
            efficiency = data.get("efficiency")
            return cls(**{**data, "efficiency": Efficiency(**efficiency) if efficiency else None})
        own = {f.name for f in fields(cls)} - {"metrics", "efficiency"}
        measured = {f.name for f in fields(Efficiency)}
        efficiency = {k: v for k, v in data.items() if k in measured}
        return cls(
            **{k: v for k, v in data.items() if k in own},
            metrics={k: v for k, v in data.items() if k not in own | measured},
            efficiency=Efficiency(**efficiency) if len(efficiency) == len(measured) else None,
        )


@dataclass
class FIDSettings:
    """`reference`: a folder of real images, an `.npz` of (mu, sigma), or "dense" (the dense
    model's images of the same prompts and seeds). `extractor`: None = clean-fid's Inception."""

    reference: str
    mode: str = "clean"
    extractor: nn.Module | None = None
    batch_size: int = 32
    cache_dir: Path | None = None  # reference statistics computed once, kept as .npz here

    def __post_init__(self) -> None:
        if self.reference != DENSE_REFERENCE:
            self.metric(Path(self.reference))  # a missing reference fails here, before any work

    def metric(self, reference: Path, device: torch.device | str = "cpu") -> FID:
        return FID(reference, self.mode, self.extractor, device, self.batch_size, self.cache_dir)


class TextImageMetric(Protocol):
    """A metric of images and their prompts: CLIPScore, ImageReward, PromptFidelity."""

    name: str

    def compute(self, images: Sequence[Path], prompts: Sequence[str]) -> dict[str, Any]: ...


@dataclass
class EvalSettings:
    name: str
    prompts: EvalPrompts
    seed: int = 0
    batch_size: int = 4
    fid: FIDSettings | None = None
    text_image: list[TextImageMetric] = field(default_factory=list)
    efficiency_repeats: int = 3  # one-image generations timed; 0 skips latency and FLOPs
    grid_size: int = 8  # the first prompts' images tiled into grid.png (the W&B grid)
    evaluate_dense: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size={self.batch_size} must be >= 1")
        if self.grid_size < 1:
            raise ValueError(f"eval.grid_size={self.grid_size} must be >= 1")
        if self.fid is not None and self.fid.reference == DENSE_REFERENCE:
            if not self.evaluate_dense:
                raise ValueError(
                    "eval.fid.reference=dense needs the dense images: set eval.dense=true"
                )
        for metric in self.text_image:
            check = getattr(metric, "check", None)  # e.g. ImageReward's environment
            if check is not None:
                check()

    def images_key(self, model_config: dict[str, Any]) -> str:
        """Hash of what fixes the images: model config, prompts and their ids, seed."""
        return _hash(
            {"model": model_config, "prompts": self.prompts.describe(), "ids": self.prompts.ids,
             "seed": self.seed}
        )  # fmt: skip

    def metrics_key(self) -> str:
        """Hash of the metric settings (a change re-scores cached images, never re-renders)."""
        fid = None
        if self.fid is not None:
            fid = (self.fid.reference, self.fid.mode, repr(self.fid.extractor))
        names = [f"{type(m).__name__}:{m.name}" for m in self.text_image]
        return _hash([fid, names, self.efficiency_repeats, self.grid_size])


def _hash(record: Any) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate_pipeline(
    pipe: DiffusionPipeline,
    model: ModelAdapter,
    settings: EvalSettings,
    out_dir: Path,
    parallel: DataParallel | None = None,
    dense_images: Path | None = None,
) -> Evaluation:
    """Images into `out_dir/images`, the evaluation into `out_dir/metrics.json` (returned on
    every rank; only rank 0 scores). `dense_images`: the reference of `fid.reference=dense`."""
    parallel = parallel or DataParallel()
    started = time.perf_counter()
    manifest = generate_images(
        pipe, model, settings.prompts, out_dir, settings.seed, settings.batch_size, parallel
    )
    evaluation = Evaluation(
        set=settings.name,
        prompts=settings.prompts.describe(),
        num_images=len(manifest),
        seed=settings.seed,
        images_dir=str((out_dir / IMAGES).resolve()),
        grid=str((out_dir / GRID_FILE).resolve()),
        generation_seconds=round(time.perf_counter() - started, 4),
        metrics_key=settings.metrics_key(),
    )
    if parallel.is_main:
        files = [out_dir / entry["file"] for entry in manifest]
        prompts = [entry["prompt"] for entry in manifest]
        grid: list[Image.Image] = [Image.open(file) for file in files[: settings.grid_size]]
        make_grid(grid).save(out_dir / GRID_FILE)
        evaluation.grid_prompts = prompts[: settings.grid_size]
        evaluation.metrics = _score(pipe, model, settings, out_dir, files, prompts, dense_images)
        if settings.efficiency_repeats > 0:
            evaluation.efficiency = measure_efficiency(
                pipe, model, repeats=settings.efficiency_repeats
            )
        write_json(out_dir / METRICS_FILE, evaluation.as_dict())
    parallel.barrier()
    if not parallel.is_main:
        evaluation = Evaluation.from_dict(json.loads((out_dir / METRICS_FILE).read_text()))
    return evaluation


def _score(
    pipe: DiffusionPipeline,
    model: ModelAdapter,
    settings: EvalSettings,
    out_dir: Path,
    files: list[Path],
    prompts: list[str],
    dense_images: Path | None,
) -> dict[str, Any]:
    device = next(model.denoiser(pipe).parameters()).device
    scores: dict[str, Any] = {}
    if settings.fid is not None:
        if settings.fid.reference != DENSE_REFERENCE:
            scores.update(settings.fid.metric(Path(settings.fid.reference), device).compute(
                out_dir / IMAGES
            ))  # fmt: skip
        elif dense_images is not None and dense_images.resolve() != (out_dir / IMAGES).resolve():
            scores.update(settings.fid.metric(dense_images, device).compute(out_dir / IMAGES))
    for metric in settings.text_image:
        scores.update(metric.compute(files, prompts))
    log.info(
        "%s on %s (%d images): %s",
        model.name,
        settings.name,
        len(files),
        ", ".join(f"{k}={v:.4g}" for k, v in scores.items() if isinstance(v, float)),
    )
    return scores


def dense_dir(
    root: Path, model: ModelAdapter, model_config: dict[str, Any], settings: EvalSettings
) -> Path:
    """Where the dense model's images for these settings (and these weights) are cached."""
    identity = {**model_config, "weights_fingerprint": model.weights_fingerprint()}
    return root / f"{model.name}-{settings.name}-{settings.images_key(identity)}"


def evaluate_dense(
    model: ModelAdapter,
    model_config: dict[str, Any],
    settings: EvalSettings,
    root: Path,
    device: torch.device,
    parallel: DataParallel | None = None,
) -> Evaluation:
    """The dense model's evaluation: read from the cache when complete, else computed (resuming
    from the images already there) and cached. The pipeline is freed before returning."""
    parallel = parallel or DataParallel()
    out_dir = dense_dir(root, model, model_config, settings)
    cached = out_dir / METRICS_FILE
    if cached.is_file():
        metrics = json.loads(cached.read_text())
        if metrics.get("metrics_key") == settings.metrics_key():
            log.info("dense evaluation from the cache: %s", out_dir)
            return Evaluation.from_dict(metrics)
    pipe = model.load().to(device)
    try:
        return evaluate_pipeline(pipe, model, settings, out_dir, parallel)
    finally:
        del pipe
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
