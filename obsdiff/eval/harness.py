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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import diffusers
import numpy as np
import pandas as pd
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from torch import nn

from obsdiff.eval.bootstrap import (
    BootstrapSettings,
    mean_interval,
    prompt_groups,
    set_statistic_interval,
)
from obsdiff.eval.dense_relative import DenseRelative
from obsdiff.eval.efficiency import (
    Efficiency,
    SpeedComparison,
    compare_latency,
    measure_efficiency,
    median_interval,
)
from obsdiff.eval.fid import FID, FIDFeatures
from obsdiff.eval.generation import (
    IMAGES,
    frame_files,
    generate_images,
    image_file,
    latents_file,
)
from obsdiff.models.base import ModelAdapter
from obsdiff.models.loading import ModelConfigError
from obsdiff.models.sampling import SamplingDefaults
from obsdiff.prompts.eval_sets import EvalPrompts
from obsdiff.runners.parallel import DataParallel
from obsdiff.toy.data import covering_prompts
from obsdiff.utils.images import captioned_grid, image_name, make_grid
from obsdiff.utils.io import write_json, write_text
from obsdiff.utils.progress import heartbeat
from obsdiff.utils.scores import ImageScores


log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
GRID_FILE = "grid.png"
COMPARISON_FILE = "comparison.png"
PER_IMAGE = "per_image.csv"
PER_FRAME = "per_frame.csv"  # a video model's scores of every frame
FID_FEATURES = "fid_features.npz"
DENSE_REFERENCE = "dense"


@dataclass
class Evaluation:
    """One model's evaluation on one prompt set: `eval/metrics.json`, and the `eval` and `dense`
    sections of a run record. `metrics` holds the scores (fid, clip_score, ... the means of the
    per-image scores) with what they were measured with (fid_reference, clip_model, ...);
    `intervals` their bootstrap intervals over prompts (`obsdiff.eval.bootstrap`); `efficiency`
    the size and latency."""

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
    intervals: dict[str, list[float]] = field(default_factory=dict)  # metric: [low, high]
    per_image: str = ""  # the per-image scores (CSV: id, prompt, seed, file, one column a metric)
    fid_features: str = ""  # what FID intervals are recomputed from (FIDFeatures, .npz)
    comparison: str = ""  # dense beside this model's images, captioned (comparison.png)
    sampling: dict[str, Any] = field(default_factory=dict)  # eval.sampling: not the model's

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
        required = {
            f.name
            for f in fields(Efficiency)
            if f.default is MISSING and f.default_factory is MISSING
        }
        efficiency = {k: v for k, v in data.items() if k in measured}
        return cls(
            **{k: v for k, v in data.items() if k in own},
            metrics={k: v for k, v in data.items() if k not in own | measured},
            efficiency=Efficiency(**efficiency) if required <= set(efficiency) else None,
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
    # the prompt of each reference image (image_name(i)), when the reference is made of images
    # of the evaluation prompts (the toy dataset's): FID intervals then resample both sides
    reference_prompts: list[str] | None = None

    def __post_init__(self) -> None:
        if self.reference != DENSE_REFERENCE:
            self.metric(Path(self.reference))  # a missing reference fails here, before any work

    def metric(self, reference: Path, device: torch.device | str = "cpu") -> FID:
        return FID(reference, self.mode, self.extractor, device, self.batch_size, self.cache_dir)


class TextImageMetric(Protocol):
    """A metric of images and their prompts: CLIPScore, ImageReward, PromptFidelity."""

    name: str

    def compute(self, images: Sequence[Path], prompts: Sequence[str]) -> ImageScores: ...


@dataclass
class EvalSettings:
    name: str
    prompts: EvalPrompts
    seed: int = 0
    batch_size: int = 4
    fid: FIDSettings | None = None
    text_image: list[TextImageMetric] = field(default_factory=list)
    # one-image generations timed (the fewest whose latency and speed-up intervals reach 95%);
    # 0 skips latency and FLOPs
    efficiency_repeats: int = 6
    grid_size: int = 8  # the first prompts' images tiled into grid.png (the W&B grid)
    evaluate_dense: bool = True
    dense_relative: DenseRelative | None = None  # PSNR, SSIM, LPIPS, ... against the dense model
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)
    # other sampling than the model's for the evaluation images only (calibration keeps the
    # model's): num_inference_steps, guidance_scale, scheduler (a diffusers scheduler class)
    sampling: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size={self.batch_size} must be >= 1")
        if self.grid_size < 1:
            raise ValueError(f"eval.grid_size={self.grid_size} must be >= 1")
        unknown = set(self.sampling) - set(SAMPLING_OVERRIDES)
        if unknown:
            raise ValueError(
                f"eval.sampling.{sorted(unknown)[0]}: not an evaluation sampling setting; use "
                f"{', '.join(SAMPLING_OVERRIDES)}"
            )
        self.generation_sampling(SamplingDefaults())  # steps and guidance typed and in range
        scheduler = self.sampling.get("scheduler")
        if scheduler is not None and not _is_scheduler(scheduler):
            raise ValueError(
                f"eval.sampling.scheduler={scheduler!r} is not a diffusers scheduler class; use "
                "e.g. FlowMatchHeunDiscreteScheduler (SD3, Flux) or DPMSolverMultistepScheduler"
            )
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
        record = {"model": model_config, "prompts": self.prompts.describe(),
                  "ids": self.prompts.ids, "seed": self.seed}  # fmt: skip
        if self.sampling:
            record["sampling"] = self.sampling
        return _hash(record)

    def generation_sampling(self, sampling: SamplingDefaults) -> SamplingDefaults:
        """`sampling` (the model's) with this evaluation's steps and guidance (checked)."""
        numbers = {k: v for k, v in self.sampling.items() if k != "scheduler"}
        try:
            return replace(sampling, **numbers)
        except ModelConfigError as err:
            raise ValueError(str(err).replace("model.sampling", "eval.sampling")) from None

    def metrics_key(self) -> str:
        """Hash of the metric settings (a change re-scores cached images, never re-renders)."""
        fid = None
        if self.fid is not None:
            fid = (self.fid.reference, self.fid.mode, repr(self.fid.extractor))
        names = [f"{type(m).__name__}:{m.name}" for m in self.text_image]
        relative = None if self.dense_relative is None else self.dense_relative.describe()
        return _hash(
            [fid, names, self.efficiency_repeats, self.grid_size, relative, asdict(self.bootstrap)]
        )

    @property
    def save_latents(self) -> bool:
        """Whether images keep their final latents (the dense-relative latent error)."""
        return self.dense_relative is not None


SAMPLING_OVERRIDES = ("num_inference_steps", "guidance_scale", "scheduler")


def _is_scheduler(name: str) -> bool:
    from diffusers import SchedulerMixin

    found = getattr(diffusers, str(name), None)
    return isinstance(found, type) and issubclass(found, SchedulerMixin)


@contextmanager
def scheduler_swapped(pipe: DiffusionPipeline, name: str | None) -> Iterator[None]:
    """`pipe` samples with scheduler class `name` (built from its own scheduler's config)
    inside the block, its own scheduler after."""
    if name is None:
        yield
        return
    own = pipe.scheduler
    pipe.scheduler = getattr(diffusers, name).from_config(own.config)
    try:
        yield
    finally:
        pipe.scheduler = own


def _hash(record: Any) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_evaluable(model: ModelAdapter, settings: EvalSettings) -> None:
    """A video model's evaluation scores every frame (its prompt's CLIP score, its dense
    model's frame for the dense-relative metrics) and averages them per video; FID compares
    sets of images and is refused for it: ValueError naming the key and the fix, before
    anything loads."""
    if model.video and settings.fid is not None:
        raise ValueError(
            f"eval={settings.name}: {model.name} generates videos of "
            f"{model.sampling.num_frames} frames, and the set's FID compares sets of images; "
            "evaluate a video model with eval=tiny_video (offline) or eval.fid.enabled=false"
        )


def evaluate_pipeline(
    pipe: DiffusionPipeline,
    model: ModelAdapter,
    settings: EvalSettings,
    out_dir: Path,
    parallel: DataParallel | None = None,
    dense: Evaluation | None = None,
) -> Evaluation:
    """Images into `out_dir/images`, the evaluation into `out_dir/metrics.json` (returned on
    every rank; only rank 0 scores), the per-image scores into `out_dir/per_image.csv`.
    `dense`: the dense model's evaluation of the same settings, the reference of
    `fid.reference=dense` and of the dense-relative metrics."""
    check_evaluable(model, settings)
    parallel = parallel or DataParallel()
    started = time.perf_counter()
    sampling = settings.generation_sampling(model.sampling)
    with scheduler_swapped(pipe, settings.sampling.get("scheduler")):
        manifest = generate_images(
            pipe, model, settings.prompts, out_dir, settings.seed, settings.batch_size, parallel,
            save_latents=settings.save_latents, sampling=sampling,
        )  # fmt: skip
    evaluation = Evaluation(
        set=settings.name,
        prompts=settings.prompts.describe(),
        num_images=len(manifest),
        seed=settings.seed,
        images_dir=str((out_dir / IMAGES).resolve()),
        grid=str((out_dir / GRID_FILE).resolve()),
        generation_seconds=round(time.perf_counter() - started, 4),
        metrics_key=settings.metrics_key(),
        sampling=dict(settings.sampling),
    )
    if parallel.is_main:
        files = [out_dir / entry["file"] for entry in manifest]
        prompts = [entry["prompt"] for entry in manifest]
        grid: list[Image.Image] = [Image.open(file) for file in files[: settings.grid_size]]
        make_grid(grid).save(out_dir / GRID_FILE)
        evaluation.grid_prompts = prompts[: settings.grid_size]
        with heartbeat(f"{model.name} on {settings.name}: scoring"):
            _score(pipe, model, settings, out_dir, manifest, dense, evaluation)
        if dense is not None and Path(dense.images_dir).resolve() != (out_dir / IMAGES).resolve():
            rows = min(settings.grid_size, 8)
            title = f"{model.name}: dense | this model (same prompt and seed)"
            comparison_grid(manifest, Path(dense.images_dir), out_dir, rows, title).save(
                out_dir / COMPARISON_FILE
            )
            evaluation.comparison = str((out_dir / COMPARISON_FILE).resolve())
        if settings.efficiency_repeats > 0:
            with heartbeat(f"{model.name}: timing {settings.efficiency_repeats} generations"):
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
    manifest: list[dict[str, Any]],
    dense: Evaluation | None,
    evaluation: Evaluation,
) -> None:
    """Every metric of the settings into `evaluation` (means, intervals, info) and
    `out_dir/per_image.csv` (one row an image, one column a per-image metric)."""
    device = next(model.denoiser(pipe).parameters()).device
    files = [out_dir / entry["file"] for entry in manifest]
    prompts = [entry["prompt"] for entry in manifest]
    groups = prompt_groups(prompts)
    table = pd.DataFrame(manifest, columns=["id", "prompt", "seed", "file"])
    scores: dict[str, Any] = {}
    # a video model: every frame scored, a video's score the mean of its frames'
    videos = (
        [frame_files(f, entry["frames"]) for f, entry in zip(files, manifest, strict=True)]
        if model.video
        else []
    )
    frames = pd.DataFrame(
        [(entry["id"], index) for entry, video in zip(manifest, videos, strict=True)
         for index in range(len(video))],
        columns=["id", "frame"],
    ) if model.video else None  # fmt: skip

    def add(result: ImageScores) -> None:
        if frames is not None:  # per frame: kept in per_frame.csv, averaged per video
            owner = frames["id"].to_numpy()
            for name, values in result.values.items():
                frames[name] = values
            ids = [entry["id"] for entry in manifest]
            result = ImageScores(
                {
                    n: np.array([v[owner == i].mean() for i in ids])
                    for n, v in result.values.items()
                },
                result.info,
            )
        for name, values in result.values.items():
            table[name] = values
            scores[name] = float(values.mean())
            interval = mean_interval(values, groups, settings.bootstrap)
            if interval is not None:
                evaluation.intervals[name] = list(interval)
        scores.update(result.info)

    dense_dir = None if dense is None else Path(dense.images_dir).parent
    own = dense_dir is not None and dense_dir.resolve() == out_dir.resolve()  # the dense model
    if settings.fid is not None:
        if settings.fid.reference != DENSE_REFERENCE:
            fid_reference: Path | None = Path(settings.fid.reference)
        else:
            fid_reference = None if dense_dir is None or own else dense_dir / IMAGES
        if fid_reference is not None:
            scores.update(
                _fid(settings, fid_reference, files, table, groups, device, out_dir, evaluation)
            )
    for metric in settings.text_image:
        if frames is None:
            add(metric.compute(files, prompts))
        else:
            frame_prompts = [p for p, video in zip(prompts, videos, strict=True) for _ in video]
            add(metric.compute([f for video in videos for f in video], frame_prompts))
    if settings.dense_relative is not None and dense_dir is not None and not own:
        add(_dense_relative(settings.dense_relative, out_dir, dense_dir, manifest))
    write_text(out_dir / PER_IMAGE, table.to_csv(index=False))
    if frames is not None:
        write_text(out_dir / PER_FRAME, frames.to_csv(index=False))
    evaluation.per_image = str((out_dir / PER_IMAGE).resolve())
    evaluation.metrics = scores
    log.info(
        "%s on %s (%d images): %s",
        model.name,
        settings.name,
        len(files),
        ", ".join(f"{k}={v:.4g}" for k, v in scores.items() if isinstance(v, float)),
    )


def _fid(
    settings: EvalSettings,
    reference: Path,
    files: list[Path],
    table: pd.DataFrame,
    groups: np.ndarray,
    device: torch.device,
    out_dir: Path,
    evaluation: Evaluation,
) -> dict[str, Any]:
    """FID of `files` against `reference` (returned, with what it was measured with), its
    interval over resampled prompts and the features it is recomputed from
    (`fid_features.npz`) into `evaluation`: a reference of images of the same prompts (the
    dense model's, the toy dataset's) is resampled with them, any other stays fixed."""
    assert settings.fid is not None
    fid = settings.fid.metric(reference, device)
    paired = FIDFeatures(fid.file_features(files), groups)  # features computed once
    value = fid.describe(fid.distance(paired.features))
    prompts = table["prompt"].tolist()
    if settings.fid.reference == DENSE_REFERENCE:  # the dense images of the same prompts
        paired.reference = fid.file_features([reference.parent / f for f in table["file"]])
        paired.reference_groups = groups
    elif settings.fid.reference_prompts is not None:
        group_of = {p: int(g) for p, g in zip(prompts, groups, strict=True)}
        if all(p in group_of for p in settings.fid.reference_prompts):
            count = len(settings.fid.reference_prompts)
            paired.reference = fid.file_features([reference / image_name(i) for i in range(count)])
            paired.reference_groups = np.array(
                [group_of[p] for p in settings.fid.reference_prompts], dtype=np.int64
            )
    if paired.reference is None:
        paired.statistics = fid.reference_statistics()
    interval = set_statistic_interval(
        paired.distance, int(groups.max()) + 1, settings.bootstrap.fid_resamples, settings.bootstrap
    )
    if interval is not None:
        evaluation.intervals["fid"] = list(interval)
    paired.save(out_dir / FID_FEATURES)
    evaluation.fid_features = str((out_dir / FID_FEATURES).resolve())
    return value


def comparison_grid(
    manifest: list[dict[str, Any]], dense_images: Path, out_dir: Path, rows: int, title: str
) -> Image.Image:
    """Dense beside pruned for `rows` prompts, captioned: toy prompts that together show every
    attribute value first, then prompts spread over the set."""
    prompts = [entry["prompt"] for entry in manifest]
    chosen = covering_prompts(prompts, rows) or []
    spread = np.linspace(0, len(manifest) - 1, rows + len(chosen)).round().astype(int)
    chosen += [int(i) for i in dict.fromkeys(spread) if i not in chosen][: rows - len(chosen)]
    lines = []
    for i in chosen:
        entry = manifest[i]
        pair = [dense_images.parent / entry["file"], out_dir / entry["file"]]
        images: list[Image.Image | None] = [Image.open(p) if p.is_file() else None for p in pair]
        lines.append((f"{entry['prompt']} (seed {entry['seed']})", images))
    return captioned_grid(lines, ["dense", "pruned"], title=title)


def _dense_relative(
    metric: DenseRelative, out_dir: Path, dense_dir: Path, manifest: list[dict[str, Any]]
) -> ImageScores:
    """The dense-relative scores of the images of `manifest`, paired by file name with the
    dense evaluation's (the same prompt ids and seeds); latents where both kept theirs. A
    video's: of each frame against the dense video's frame (no latents)."""
    if "frames" in manifest[0]:
        mine = [f for e in manifest for f in frame_files(out_dir / e["file"], e["frames"])]
        theirs = [f for e in manifest for f in frame_files(dense_dir / e["file"], e["frames"])]
        missing = [str(f) for f in theirs if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} frames of the dense evaluation are missing (e.g. {missing[0]})"
            )
        return metric.compute(mine, theirs)
    dense_files = [dense_dir / entry["file"] for entry in manifest]
    missing = [str(f) for f in dense_files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} images of the dense evaluation are missing (e.g. {missing[0]}): "
            "the dense model was evaluated on other prompts or ids"
        )
    names = [latents_file(entry["file"]) for entry in manifest]
    latents = [out_dir / n for n in names]
    dense_latents = [dense_dir / n for n in names]
    if not all(f.is_file() for f in latents + dense_latents):
        latents = dense_latents = []
    return metric.compute(
        [out_dir / entry["file"] for entry in manifest],
        dense_files,
        latents or None,
        dense_latents or None,
    )


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
        latents = not settings.save_latents or all(
            (out_dir / latents_file(image_file(i))).is_file() for i in settings.prompts.ids
        )  # a cache filled before latents were kept renders them now
        if metrics.get("metrics_key") == settings.metrics_key() and latents:
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


def latency_against_dense(
    pipe: DiffusionPipeline, model: ModelAdapter, repeats: int
) -> SpeedComparison:
    """Load the dense model's denoiser beside the pruned pipeline `pipe` (its own device) and
    time both in this process, alternately (`compare_latency`); the dense copy is freed."""
    if model.pipeline is not None:
        raise ValueError("the dense model of a pipeline pruned in place is gone: nothing to time")
    device = next(model.denoiser(pipe).parameters()).device
    dense = model.denoiser(model.load()).to(device)  # the rest of that pipeline is dropped
    try:
        with heartbeat(f"{model.name}: timing dense and pruned, {repeats} each"):
            return compare_latency(pipe, model, dense, repeats)
    finally:
        del dense
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def with_latency(
    evaluation: Evaluation, seconds_per_image: float, image_seconds: Sequence[float] = ()
) -> Evaluation:
    """The evaluation with its latency replaced by one measured back to back (a copy):
    `image_seconds`, that measurement's per-repeat times, give the record's times and interval;
    without them the evaluation's own times and interval, of another measurement, are dropped."""
    efficiency = evaluation.efficiency
    if efficiency is None:
        return evaluation
    interval = median_interval(image_seconds)
    return replace(
        evaluation,
        efficiency=replace(
            efficiency,
            seconds_per_image=seconds_per_image,
            seconds_per_forward=seconds_per_image / efficiency.forwards_per_image,
            image_seconds=list(image_seconds),
            seconds_per_image_interval=None if interval is None else [interval.low, interval.high],
            interval_confidence=None if interval is None else interval.confidence,
        ),
    )
