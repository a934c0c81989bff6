"""Reading a sweep: every job directory's run record (`results.json`, nothing else), as one
`JobResult` per job and one per dense reference, then grouped and ordered for the tables."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from obsdiff.artifacts.record import (
    RESULTS,
    RecordError,
    RunRecord,
    evaluation_intervals,
    evaluation_numbers,
)
from obsdiff.eval.harness import Evaluation


log = logging.getLogger(__name__)

INCOMPLETE = "Jobs that did not complete (failed, interrupted, killed or still running)"
DENSE = "dense"
HIGHER_IS_BETTER = {
    "clip_score": True,
    "image_reward": True,
    "prompt_fidelity": True,
    "fid": False,
    "psnr": True,
    "ssim": True,
    "lpips": False,
    "latent_rel_error": False,
    "toy_feature_distance": False,
}
QUALITY = ("fid", "clip_score", "image_reward", "prompt_fidelity")
DENSE_RELATIVE = ("psnr", "ssim", "lpips", "latent_rel_error", "toy_feature_distance")
EFFICIENCY = (
    "params", "tflops_per_forward", "seconds_per_image", "seconds_per_forward",
    "generation_seconds",
)  # fmt: skip
# timed by each job in its own process, under its own load: never plotted against each other
# (the speed-up, timed back to back within a job, is)
OWN_PROCESS_TIMINGS = ("seconds_per_image", "seconds_per_forward", "generation_seconds")
SPEEDUP = "speedup"
BREAKDOWNS = ("prompt_fidelity_",)  # per-attribute parts of a metric: CSV only
EVAL_INFO = ("num_images", "seed", "num_inference_steps", "forwards_per_image")  # not metrics
SETTINGS = ("model", "method", "granularity", "sparsity", "weighting", "packages")
RUN = (
    "achieved_sparsity", "params_before", "params_after", "tflops_before", "tflops_after",
    "target_parameters", "target_nonzero", "layer_loss", "calibration_seconds",
    "solve_seconds", "wall_seconds", "peak_memory_bytes", "statistics_bytes",
    "speedup", "speedup_low", "speedup_high", "speedup_confidence",
)  # fmt: skip
LABELS = {
    "fid": "FID",
    "clip_score": "CLIP score",
    "image_reward": "ImageReward",
    "prompt_fidelity": "prompt fidelity",
    "params": "params",
    "tflops_per_forward": "TFLOPs / forward",
    "seconds_per_image": "s / image",
    "seconds_per_forward": "s / forward",
    "generation_seconds": "generation s",
    "psnr": "PSNR",
    "ssim": "SSIM",
    "lpips": "LPIPS",
    "latent_rel_error": "latent error",
    "toy_feature_distance": "feature distance",
    "achieved_sparsity": "achieved",
    "target_nonzero": "non-zero",
    "layer_loss": "layer loss",
    "calibration_seconds": "calibration s",
    "solve_seconds": "solve s",
    "wall_seconds": "wall s",
    "peak_memory_bytes": "peak memory",
    "statistics_bytes": "statistics bytes",
    "weight_bytes": "quantized weights (bytes)",
    "speedup": "speed-up",
}
SHORTFALL = 0.005  # achieved sparsity this far below the target is flagged


@dataclass
class JobResult:
    """One job of the sweep (or the dense reference measured by one)."""

    job: str  # the job directory relative to the sweep directory
    path: Path
    status: str  # "completed" or "failed"
    error: str = ""
    settings: dict[str, Any] = field(default_factory=dict)  # SETTINGS, then other overrides
    metrics: dict[str, float] = field(default_factory=dict)  # numeric keys of "eval"
    run: dict[str, float] = field(default_factory=dict)  # sizes, TFLOPs, timings
    info: dict[str, Any] = field(default_factory=dict)  # eval set, number of images
    images_dir: Path | None = None
    dense: JobResult | None = None  # the dense model as evaluated by this job
    # 95% of metrics (over prompts) and of the seconds per image (over its timed repeats)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    per_image: Path | None = None  # the per-image scores (CSV)
    fid_features: Path | None = None  # what paired FID differences are recomputed from

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def method(self) -> str:
        return str(self.settings.get("method") or "?")

    @property
    def model(self) -> str:
        return str(self.settings.get("model") or "?")

    @property
    def sparsity(self) -> float | None:
        value = self.settings.get("sparsity")
        return float(value) if isinstance(value, int | float) else None

    @property
    def shortfall(self) -> bool:
        """Whether the achieved sparsity falls more than half a point below the target (Wanda
        and DSnoT floor each row's count: int(n * s))."""
        achieved = self.run.get("achieved_sparsity")
        target = self.sparsity
        return achieved is not None and target is not None and achieved < target - SHORTFALL


# ---------------------------------------------------------------------------- reading the sweep


def _natural(path: Path) -> list[tuple[int, int, str]]:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts]


def _subdirs(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]


def find_job_dirs(root: Path) -> list[Path]:
    """`root` itself if it is a run directory, else its job directories, one or two levels down."""
    if _is_job(root):
        return [root]
    found = []
    for child in _subdirs(root):
        if _is_job(child):
            found.append(child)
        else:
            found.extend(p for p in _subdirs(child) if _is_job(p))
    return sorted(found, key=lambda p: _natural(p.relative_to(root)))


def _is_job(path: Path) -> bool:
    """A run directory: a run record, Hydra's folder, or any job folder of a multirun (one
    killed before writing anything)."""
    if (path / RESULTS).is_file() or (path / ".hydra").is_dir():
        return True
    return (path.parent / "multirun.yaml").is_file() and not (path / "report.json").is_file()


def _settings(record: RunRecord) -> dict[str, Any]:
    """The run's identity (SETTINGS), then its other command-line settings (a sweep's axes)."""
    names = asdict(record.identity)
    settings = {key: names.get(key) for key in SETTINGS}
    for axis in ("modulation", "recover", "quantize"):  # where set: one more axis each
        if names.get(axis) is not None:
            settings[axis] = names[axis]
    settings.update((k, _as_number(v)) for k, v in record.overrides.items() if k not in SETTINGS)
    return settings


def _as_number(value: Any) -> Any:
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def _error(record: RunRecord) -> str:
    """Empty for a completed job, else why it did not complete."""
    if record.status == "failed":
        return record.error or "failed (no error message)"
    if not record.completed:
        return f"incomplete ({record.status}): {record.error or 'crashed, killed or still running'}"
    return ""


def _evaluated(result: JobResult, evaluation: Evaluation | None) -> JobResult:
    """Fill metrics, info and images_dir from an evaluation."""
    if evaluation is None:
        return result
    numbers = evaluation_numbers(evaluation)
    result.metrics = {k: v for k, v in numbers.items() if k not in EVAL_INFO}
    result.info = {"eval_set": evaluation.set, **{k: numbers.get(k) for k in EVAL_INFO}}
    result.intervals = {k: (v[0], v[1]) for k, v in evaluation_intervals(evaluation).items()}
    result.images_dir = _path(result, evaluation.images_dir)
    result.per_image = _path(result, evaluation.per_image)
    result.fid_features = _path(result, evaluation.fid_features)
    return result


def _path(result: JobResult, recorded: str) -> Path | None:
    """A path of the record (absolute, or relative to the job directory)."""
    if not recorded:
        return None
    path = Path(recorded).expanduser()
    return path if path.is_absolute() else result.path / path


def read_job(path: Path, name: str) -> JobResult:
    try:
        record = RunRecord.read(path)
    except RecordError as err:
        return JobResult(name, path, "failed", str(err).replace(f"{path / RESULTS}: ", ""))
    settings = _settings(record)
    error = _error(record)
    job = JobResult(name, path, "failed" if error else "completed", error, settings)
    if error:
        return job
    if record.prune is not None:
        job.run = {
            k: v for k, v in asdict(record.prune).items() if _number(v) and k not in SETTINGS
        }
    if record.quantize is not None:  # the denoiser's weights in memory, quantized
        job.run["weight_bytes"] = record.quantize.weight_bytes_after
        job.run["weight_bytes_unquantized"] = record.quantize.weight_bytes_before
    if record.speed is not None:
        job.run[SPEEDUP] = record.speed.speedup
        if record.speed.speedup_interval is not None:
            job.run["speedup_low"], job.run["speedup_high"] = record.speed.speedup_interval
        if record.speed.interval_confidence is not None:
            job.run["speedup_confidence"] = record.speed.interval_confidence
    _evaluated(job, record.eval)
    if record.dense is not None:
        dense = {"model": settings["model"], "method": DENSE, "granularity": None, "sparsity": 0.0}
        reference = JobResult(f"{name}/dense", path, "completed", "", dense)
        job.dense = _evaluated(reference, record.dense)
    return job


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_jobs(sweep_dir: str | Path) -> list[JobResult]:
    """Every job of the sweep, in job order: one log line each, failures as warnings."""
    root = Path(sweep_dir)
    dirs = find_job_dirs(root)
    log.info("%s: %d job directories", root, len(dirs))
    jobs = []
    for number, path in enumerate(dirs, start=1):
        job = read_job(path, path.name if path == root else path.relative_to(root).as_posix())
        jobs.append(job)
        if job.completed:
            log.info(
                "read job %d/%d %s: %s, sparsity %s", number, len(dirs), job.job, job.method,
                job.sparsity,
            )  # fmt: skip
        else:
            log.warning(
                "read job %d/%d %s (%s, sparsity %s): failed: %s", number, len(dirs), job.job,
                job.method, job.sparsity, job.error,
            )  # fmt: skip
    return jobs


# ---------------------------------------------------------------------------- organising


def references(jobs: Sequence[JobResult]) -> dict[str, JobResult]:
    """The dense reference of each model: the "dense" block of its first job that has one, else
    its first completed `method=dense` job."""
    found: dict[str, JobResult] = {}
    for job in jobs:
        if job.dense is not None:
            found.setdefault(job.model, job.dense)
    for job in jobs:
        if job.completed and job.method == DENSE:
            found.setdefault(job.model, job)
    return found


def groups(jobs: Sequence[JobResult]) -> dict[tuple[str, str], list[JobResult]]:
    """The pruned jobs, failed ones included, by (model, granularity)."""
    found: dict[tuple[str, str], list[JobResult]] = {}
    for job in jobs:
        if job.method != DENSE:
            granularity = str(job.settings.get("granularity") or "?")
            found.setdefault((job.model, granularity), []).append(job)
    return dict(sorted(found.items()))


def varying_keys(jobs: Sequence[JobResult]) -> list[str]:
    """Settings other than model, method, granularity and sparsity that differ among the jobs."""
    pruned = [j for j in jobs if j.method != DENSE]
    extra = sorted({k for j in pruned for k in j.settings if k not in SETTINGS})
    return [
        k
        for k in ("weighting", "packages", *extra)
        if len({str(j.settings.get(k)) for j in pruned}) > 1
    ]


def row_order(job: JobResult, keys: Sequence[str]) -> tuple[Any, ...]:
    """Dense, obsdiff, then the other methods alphabetically; sparsity ascending."""
    rank = {DENSE: 0, "obsdiff": 1}.get(job.method, 2)
    sparsity = -1.0 if job.sparsity is None else job.sparsity
    return (rank, job.method, sparsity, tuple(str(job.settings.get(k)) for k in keys))


def series_label(job: JobResult, keys: Sequence[str], sep: str = ", ") -> str:
    return sep.join([job.method, *(f"{k}={job.settings.get(k)}" for k in keys)])


def metric_columns(jobs: Sequence[JobResult]) -> list[str]:
    """Metrics that at least one job has: quality (known, then others), dense-relative, then
    efficiency; per-attribute breakdowns (prompt_fidelity_<attribute>) stay in the CSV only."""
    present = {k for job in jobs for k in job.metrics}
    known = set(QUALITY) | set(DENSE_RELATIVE) | set(EFFICIENCY)
    others = sorted(k for k in present - known if not k.startswith(BREAKDOWNS))
    ordered = [*QUALITY, *others, *DENSE_RELATIVE, *EFFICIENCY]
    return [k for k in ordered if k in present]
