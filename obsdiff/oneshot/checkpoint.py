"""The resume checkpoint of a prune run: after each package the denoiser and the progress,
committed atomically; a re-run of the same job resumes after the last finished package."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import safetensors.torch
from torch import nn

from obsdiff.artifacts.pruned import MANIFEST
from obsdiff.calibration.sequential import (
    LoopReport,
)
from obsdiff.methods.package import record_from_dict
from obsdiff.models.surgery import restore_shapes, shapes
from obsdiff.oneshot.job import JobError
from obsdiff.utils.io import save_tensors, write_json


log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"


def check_previous_run(run_dir: Path, run_key: str) -> None:
    """Refuse a directory whose saved model or checkpoint belongs to another run (before
    anything is loaded; the apps also compare the whole config: `app.shell.check_run_dir`)."""
    for record in (run_dir / CHECKPOINT_DIR / "progress.json", run_dir / MANIFEST):
        if record.is_file():
            previous = json.loads(record.read_text()).get("run_key")
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
            self.dir / "progress.json",
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

    def restore(self) -> LoopReport:
        """Weights, shapes and records of the finished packages (nothing when starting fresh)."""
        progress_file = self.dir / "progress.json"
        if not progress_file.is_file():
            return LoopReport()
        progress = json.loads(progress_file.read_text())
        if progress["run_key"] != self.run_key:
            raise JobError(
                f"{self.dir.parent} holds a checkpoint of a different run (run key "
                f"{progress['run_key']} vs {self.run_key}); use a new run directory"
            )
        restore_shapes(self.denoiser, progress["structure"])
        weights = progress.get("weights", "denoiser.safetensors")  # older checkpoints: one name
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
