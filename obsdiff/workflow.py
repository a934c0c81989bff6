"""A prune run: validate the job, calibrate and prune package by package, checkpoint, save.

`PruneJob` holds typed objects (built once from the Hydra config by the app) and checks every
combination before a model is loaded; `run_prune` does the work and writes the run directory.
Re-running the same job on the same directory resumes after the last finished package.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from obsdiff.calibration.packages import UnitRef, list_units, split_packages
from obsdiff.calibration.prompts import PromptSet
from obsdiff.calibration.sequential import (
    CalibrationSettings,
    LoopReport,
    calibrate_and_prune,
    embed_batches,
)
from obsdiff.methods.base import LayerRecord, PruningMethod
from obsdiff.methods.granularity import Granularity
from obsdiff.models.base import ModelAdapter, linear_at
from obsdiff.pruned import save_pruned, save_tensors, write_json
from obsdiff.pruning.patterns import Pattern
from obsdiff.pruning.schedules import TimestepWeighting


log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
RUN_KEY_EXCLUDE = ("paths", "device")


class JobError(ValueError):
    """The combination of settings cannot run; raised before any model is loaded."""


@dataclass
class PruneJob:
    model: ModelAdapter
    model_config: dict[str, Any]
    method: PruningMethod
    granularity: Granularity
    sparsity: float
    weighting: TimestepWeighting
    packages: int
    prompts: PromptSet
    calibration: CalibrationSettings
    device: torch.device
    config: dict[str, Any]
    blocks: tuple[int, int] | None = None
    save: bool = True

    def __post_init__(self) -> None:
        try:
            self.method.check_granularity(self.granularity.kind)
            if self.granularity.kind == "structured":
                raise ValueError(
                    "structured pruning (heads and neurons) is not available in the prune app "
                    "yet; use granularity=unstructured, semi_2_4 or semi_4_8"
                )
            self.pattern: Pattern = self.granularity.pattern(self.sparsity)
            self.weighting.weights(self.model.sampling.num_inference_steps)
        except ValueError as err:
            raise JobError(str(err)) from err
        if self.packages < 1:
            raise JobError(f"packages={self.packages} must be >= 1")
        if self.blocks is not None and not (0 <= self.blocks[0] < self.blocks[1]):
            raise JobError(f"blocks={list(self.blocks)} must be [start, end) with 0 <= start < end")
        if self.calibration.batch_size < 1:
            raise JobError(f"calibration.batch_size={self.calibration.batch_size} must be >= 1")

    @property
    def run_key(self) -> str:
        """Hash of everything that determines the result (not paths or devices)."""
        semantic = {k: v for k, v in self.config.items() if k not in RUN_KEY_EXCLUDE}
        return hashlib.sha256(
            json.dumps(semantic, sort_keys=True, default=str).encode()
        ).hexdigest()[:16]


def _target_modules(
    denoiser: nn.Module, packages: list[list[UnitRef]]
) -> list[tuple[str, nn.Linear]]:
    return [
        (name, linear_at(denoiser, name))
        for package in packages
        for unit in package
        for name in unit.module_names
    ]


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


class Checkpointer:
    """After each package: that package's pruned weights and the progress, in the run dir."""

    def __init__(
        self, run_dir: Path, run_key: str, denoiser: nn.Module, packages: list[list[UnitRef]]
    ):
        self.dir = run_dir / CHECKPOINT_DIR
        self.run_key = run_key
        self.denoiser = denoiser
        self.packages = packages

    def save(self, index: int, report: LoopReport) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        weights = {
            f"{name}.weight": linear_at(self.denoiser, name).weight
            for unit in self.packages[index]
            for name in unit.module_names
        }
        save_tensors(self.dir / f"package_{index:04d}.safetensors", weights)
        write_json(
            self.dir / "progress.json",
            {
                "run_key": self.run_key,
                "packages_done": index + 1,
                "calibration_seconds": report.calibration_seconds,
                "solve_seconds": report.solve_seconds,
                "records": [r.as_dict() for r in report.records],
            },
        )

    def restore(self) -> LoopReport:
        """Weights and records of the finished packages (none when starting fresh)."""
        progress_file = self.dir / "progress.json"
        if not progress_file.is_file():
            return LoopReport()
        progress = json.loads(progress_file.read_text())
        if progress["run_key"] != self.run_key:
            raise JobError(
                f"{self.dir.parent} holds a checkpoint of a different run (run key "
                f"{progress['run_key']} vs {self.run_key}); use a new run directory"
            )
        done = int(progress["packages_done"])
        for index in range(done):
            state = safetensors.torch.load_file(str(self.dir / f"package_{index:04d}.safetensors"))
            for key, tensor in state.items():
                module = linear_at(self.denoiser, key.removesuffix(".weight"))
                module.weight.data.copy_(tensor.to(module.weight.device, module.weight.dtype))
        records = [
            LayerRecord(r["name"], tuple(r["shape"]), r["pruned"], r["loss"])
            for r in progress["records"]
        ]
        log.info("resuming after package %d of %d", done, len(self.packages))
        return LoopReport(
            records=records,
            calibration_seconds=progress["calibration_seconds"],
            solve_seconds=progress["solve_seconds"],
            packages_done=done,
        )


def run_prune(job: PruneJob, run_dir: Path) -> dict[str, Any]:
    """Prune `job.model`, write the run directory, return the results (also in results.json)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pipe = job.model.load().to(job.device)
    pipe.set_progress_bar_config(leave=False)
    denoiser = job.model.denoiser(pipe)
    try:
        units = list_units(job.model, denoiser, job.blocks)
        packages = split_packages(units, job.packages)
    except ValueError as err:
        raise JobError(str(err)) from err
    targets = _target_modules(denoiser, packages)
    params_before = sum(p.numel() for p in denoiser.parameters())
    nonzero_before = sum(int(m.weight.count_nonzero()) for _, m in targets)
    steps = job.model.sampling.num_inference_steps
    step_weights = job.weighting.weights(steps)

    checkpointer = Checkpointer(run_dir, job.run_key, denoiser, packages)
    previous = checkpointer.restore()
    embeddings = []
    if job.method.needs_calibration and previous.packages_done < len(packages):
        embeddings = embed_batches(
            job.model, pipe, job.prompts.prompts, job.calibration.batch_size, job.device
        )
    report = calibrate_and_prune(
        pipe,
        job.model,
        job.method,
        job.pattern,
        packages,
        step_weights,
        embeddings,
        job.calibration,
        start_package=previous.packages_done,
        on_package_done=lambda index, r: checkpointer.save(index, _merged(previous, r)),
    )
    report = _merged(previous, report)

    total = sum(m.weight.numel() for _, m in targets)
    pruned = sum(r.pruned for r in report.records)
    results = {
        "model": job.model.name,
        "method": job.method.name,
        "granularity": job.granularity.name,
        "sparsity": job.sparsity,
        "achieved_sparsity": pruned / total,
        "target_modules": len(targets),
        "target_parameters": total,
        "params_before": params_before,
        "params_after": sum(p.numel() for p in denoiser.parameters()),
        "nonzero_target_parameters_before": nonzero_before,
        "nonzero_target_parameters_after": sum(int(m.weight.count_nonzero()) for _, m in targets),
        "packages": len(packages),
        "weighting": job.weighting.scheme,
        "calibration_seconds": round(report.calibration_seconds, 4),
        "solve_seconds": round(report.solve_seconds, 4),
        "wall_seconds": round(time.perf_counter() - started, 4),
        "peak_memory_bytes": _peak_memory_bytes(job.device),
        "device": str(job.device),
    }
    if job.save:
        save_pruned(run_dir, denoiser, _manifest(job, results, report, packages))
    write_json(run_dir / "results.json", results)
    log.info(
        "%s %s %.0f%%: achieved %.4f over %d target linears (calibration %.1f s, solve %.1f s)",
        job.method.name,
        job.granularity.name,
        100 * job.sparsity,
        results["achieved_sparsity"],
        len(targets),
        report.calibration_seconds,
        report.solve_seconds,
    )
    return results


def _merged(previous: LoopReport, current: LoopReport) -> LoopReport:
    return LoopReport(
        records=previous.records + current.records,
        calibration_seconds=previous.calibration_seconds + current.calibration_seconds,
        solve_seconds=previous.solve_seconds + current.solve_seconds,
        packages_done=current.packages_done,
    )


def _manifest(
    job: PruneJob, results: dict[str, Any], report: LoopReport, packages: list[list[UnitRef]]
) -> dict[str, Any]:
    steps = job.model.sampling.num_inference_steps
    return {
        "format": 1,
        "run_key": job.run_key,
        "model": job.model.describe(),
        "model_config": job.model_config,
        "method": job.method.describe(),
        "granularity": job.granularity.name,
        "sparsity": job.sparsity,
        "achieved_sparsity": results["achieved_sparsity"],
        "weighting": job.weighting.describe(steps),
        "packages": len(packages),
        "package_units": [len(p) for p in packages],
        "blocks": list(job.blocks) if job.blocks else None,
        "calibration": {
            **job.prompts.describe(),
            "batch_size": job.calibration.batch_size,
            "seed": job.calibration.seed,
            "include_uncond": job.calibration.include_uncond,
            "num_inference_steps": steps,
            "guidance_scale": job.model.sampling.guidance_scale,
            "resolution": [job.model.sampling.height, job.model.sampling.width],
        },
        "layers": [r.as_dict() for r in report.records],
        "versions": {
            name: version(name) for name in ("obsdiff", "torch", "diffusers", "transformers")
        },
    }
