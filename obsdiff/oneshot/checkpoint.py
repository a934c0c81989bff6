"""The resume checkpoint of a prune run: after each package the denoiser and the progress,
committed atomically; a re-run of the same job resumes after the last finished package."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from obsdiff.artifacts.pruned import MANIFEST
from obsdiff.calibration.sequential import (
    LoopReport,
)
from obsdiff.methods.package import record_from_dict
from obsdiff.models.surgery import restore_shapes, shapes
from obsdiff.oneshot.job import JobError
from obsdiff.utils.file_checks import safetensors_problem
from obsdiff.utils.io import save_tensors, write_json


log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
PROGRESS = "progress.json"
SCORES = "scores.safetensors"  # a method's pass before the packages (Taylor scores, masks)
SCORES_INFO = "scores.json"
LEGACY_WEIGHTS = "denoiser.safetensors"  # older checkpoints: one weights file of this name
PROGRESS_FIELDS: dict[str, type | tuple[type, ...]] = {  # what a resume reads, and its type
    "run_key": str,
    "packages_done": int,
    "calibration_seconds": (int, float),
    "solve_seconds": (int, float),
    "records": list,
    "structure": dict,
}


def check_previous_run(run_dir: Path, run_key: str) -> None:
    """Refuse a directory whose saved model or checkpoint belongs to another run, and a
    checkpoint a resume cannot read (`check_checkpoint`): before anything is loaded (the apps
    also compare the whole config: `app.shell.check_run_dir`)."""
    manifest = run_dir / MANIFEST
    if manifest.is_file():
        previous = _json_object(manifest)
        if previous is None:
            raise JobError(
                f"{manifest} cannot be read (not JSON): {run_dir} holds a damaged pruned model; "
                "start a new run (a new run directory)"
            )
        _check_run_key(run_dir, manifest, previous.get("run_key"), run_key)
    check_checkpoint(run_dir, run_key)


def check_checkpoint(run_dir: Path, run_key: str) -> None:
    """Refuse the resume checkpoint of `run_dir` (when there is one) if it belongs to another
    run, or if a resume could not read it: `progress.json` parses and has every field, and the
    weights file it names is there with an intact safetensors header that matches its size (no
    tensor is read). One `JobError` naming the file and the fix."""
    folder = run_dir / CHECKPOINT_DIR
    progress_file = folder / PROGRESS
    if not progress_file.is_file():
        return
    fix = f"delete {folder}/ to start the pruning again, or start a new run (a new run directory)"
    progress = _json_object(progress_file)
    if progress is None:
        raise JobError(f"{progress_file} is damaged (not a JSON object): {fix}")
    _check_run_key(run_dir, progress_file, progress.get("run_key"), run_key)
    wrong = [
        key
        for key, kind in PROGRESS_FIELDS.items()
        if not isinstance(progress.get(key), kind) or isinstance(progress.get(key), bool)
    ]
    if wrong:
        raise JobError(f"{progress_file} is damaged (missing or wrong: {', '.join(wrong)}): {fix}")
    name = progress.get("weights", LEGACY_WEIGHTS)
    if not isinstance(name, str) or Path(name).name != name:
        raise JobError(f"{progress_file} is damaged (weights={name!r}): {fix}")
    weights = folder / name
    problem = safetensors_problem(weights)
    if problem is not None:
        raise JobError(f"{weights}, named by {progress_file}, is damaged ({problem}): {fix}")


def _json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when it is not one (cut short, not JSON)."""
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _check_run_key(run_dir: Path, record: Path, previous: Any, run_key: str) -> None:
    if previous not in (None, run_key):
        raise JobError(
            f"{run_dir} holds {record.name} of a different run (run key {previous} vs "
            f"{run_key}); use a new run directory"
        )


class Checkpointer:
    """After each package: the denoiser (weights and shapes) and the progress, in the run dir.

    `progress.json` is the commit point: the weights of package i go to a file of their own
    (`denoiser-<i>.safetensors`), then progress.json names it (an atomic replace), then the
    previous weights file goes. An interruption at any moment leaves a progress.json whose
    weights file exists and matches its package count, so a resume never prunes a package
    twice."""

    def __init__(self, run_dir: Path, run_key: str, denoiser: nn.Module, num_packages: int):
        self.dir = run_dir / CHECKPOINT_DIR
        self.run_key = run_key
        self.denoiser = denoiser
        self.num_packages = num_packages

    def save(self, index: int, report: LoopReport) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        weights = f"denoiser-{index + 1}.safetensors"
        save_tensors(self.dir / weights, self.denoiser.state_dict())
        write_json(
            self.dir / PROGRESS,
            {
                "run_key": self.run_key,
                "weights": weights,
                "packages_done": index + 1,
                "calibration_seconds": report.calibration_seconds,
                "solve_seconds": report.solve_seconds,
                "records": [r.as_dict() for r in report.records],
                "structure": shapes(self.denoiser),
            },
        )
        for old in self.dir.glob("denoiser*.safetensors"):
            if old.name != weights:
                old.unlink()

    def save_scores(self, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        """The pass before the packages (a gradient method's scores or masks), kept so that a
        resume does not redo it: the tensors, then the JSON that commits them."""
        self.dir.mkdir(parents=True, exist_ok=True)
        save_tensors(self.dir / SCORES, tensors)
        write_json(self.dir / SCORES_INFO, {"run_key": self.run_key, **info})

    def restore_scores(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """What `save_scores` kept for this run, or None (a fresh run, or a pass cut short)."""
        info = _json_object(self.dir / SCORES_INFO) if (self.dir / SCORES_INFO).is_file() else None
        if info is None or info.pop("run_key", None) != self.run_key:
            return None
        if safetensors_problem(self.dir / SCORES) is not None:
            return None
        log.info("resuming with the scores of the first pass (%s)", self.dir / SCORES)
        return safetensors.torch.load_file(str(self.dir / SCORES)), info

    def restore(self) -> LoopReport:
        """Weights, shapes and records of the finished packages (nothing when starting fresh)."""
        progress_file = self.dir / PROGRESS
        if not progress_file.is_file():
            return LoopReport()
        check_checkpoint(self.dir.parent, self.run_key)
        progress = json.loads(progress_file.read_text())
        restore_shapes(self.denoiser, progress["structure"])
        weights = progress.get("weights", LEGACY_WEIGHTS)
        state = safetensors.torch.load_file(str(self.dir / weights))
        self.denoiser.load_state_dict(state, strict=True)
        log.info("resuming after package %d of %d", progress["packages_done"], self.num_packages)
        return LoopReport(
            records=[record_from_dict(r) for r in progress["records"]],
            calibration_seconds=progress["calibration_seconds"],
            solve_seconds=progress["solve_seconds"],
            packages_done=int(progress["packages_done"]),
        )


def remove_checkpoint(run_dir: Path) -> None:
    """Delete the resume checkpoint of a finished run (a full copy of the denoiser)."""
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
