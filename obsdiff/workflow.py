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
import shutil
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
from obsdiff.methods.base import GroupJob, LayerRecord, PruningMethod
from obsdiff.methods.granularity import Granularity
from obsdiff.models.base import ModelAdapter, linear_at
from obsdiff.pruned import MANIFEST, save_pruned
from obsdiff.pruning.obs_structured import structured_count
from obsdiff.pruning.patterns import NM, Pattern
from obsdiff.pruning.schedules import TimestepWeighting
from obsdiff.pruning.statistics import PRODUCTS
from obsdiff.runners.parallel import DataParallel
from obsdiff.structured import StructuredRecord, prune_structured_package
from obsdiff.surgery import restore_shapes, shapes
from obsdiff.utils.flops import pipeline_flops
from obsdiff.utils.io import save_tensors, write_json


log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
RUN_KEY_EXCLUDE = ("paths", "device", "runner", "tracking", "keep_checkpoint")


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
    keep_checkpoint: bool = False

    def __post_init__(self) -> None:
        try:
            self.method.check_granularity(self.granularity.kind)
            self.pattern: Pattern | None = self.granularity.pattern(self.sparsity)
            self.weighting.weights(self.model.sampling.num_inference_steps)
        except ValueError as err:
            raise JobError(str(err)) from err
        if self.packages < 1:
            raise JobError(f"packages={self.packages} must be >= 1")
        if self.blocks is not None and not (0 <= self.blocks[0] < self.blocks[1]):
            raise JobError(f"blocks={list(self.blocks)} must be [start, end) with 0 <= start < end")
        if self.calibration.hessian_precision not in PRODUCTS:
            raise JobError(
                f"calibration.hessian_precision={self.calibration.hessian_precision!r}; use one "
                f"of {PRODUCTS}"
            )
        if self.calibration.batch_size < 1:
            raise JobError(f"calibration.batch_size={self.calibration.batch_size} must be >= 1")

    @property
    def run_key(self) -> str:
        """Hash of everything that determines the result (not paths or devices)."""
        semantic = {k: v for k, v in self.config.items() if k not in RUN_KEY_EXCLUDE}
        return hashlib.sha256(
            json.dumps(semantic, sort_keys=True, default=str).encode()
        ).hexdigest()[:16]


def plan_packages(
    job: PruneJob, denoiser: nn.Module
) -> tuple[list[list[UnitRef]], list[tuple[str, nn.Linear]]]:
    """The packages and target linears of `job` on `denoiser`, with every layout check (block
    range, package count, N:M columns, head and FFN widths). Works on the weightless skeleton
    (`check_layout`) as on the loaded denoiser."""
    structured = job.granularity.kind == "structured"
    try:
        units = list_units(job.model, denoiser, job.blocks, structured=structured)
        packages = split_packages(units, job.packages)
    except ValueError as err:
        raise JobError(str(err)) from err
    targets = _target_modules(denoiser, packages)
    if job.pattern is not None:
        _check_nm_columns(targets, job.pattern)
    else:
        _check_structured(job.model, denoiser, units, job.sparsity)
    return packages, targets


def check_layout(job: PruneJob) -> None:
    """Every layout check of `plan_packages` on the model's architecture alone (built from its
    config on the meta device, or the tiny recipe): before any weights are loaded."""
    plan_packages(job, job.model.denoiser_skeleton())


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


def _check_nm_columns(targets: list[tuple[str, nn.Linear]], pattern: Pattern) -> None:
    if isinstance(pattern, NM):
        for name, module in targets:
            if module.in_features % pattern.m:
                raise JobError(
                    f"{name} has {module.in_features} inputs, not divisible by M={pattern.m} of "
                    f"{pattern.n}:{pattern.m}; exclude its block with blocks=[start,end)"
                )


def _check_structured(
    adapter: ModelAdapter, denoiser: nn.Module, units: list[UnitRef], sparsity: float
) -> None:
    """Every head group splits evenly into heads, every FFN into its recorded width, and the
    sparsity leaves at least one head and one neuron in each."""
    for block_name in dict.fromkeys(unit.block_name for unit in units):
        block = denoiser.get_submodule(block_name)
        heads, neurons = adapter.structured_groups(block)
        for group in heads:
            count = int(block.get_submodule(group.attention).heads)  # type: ignore[arg-type]
            _check_keeps_one(sparsity, count, f"heads of {block_name}.{group.attention}")
            for name in group.producers:
                width = linear_at(block, name).out_features
                if width % count:
                    raise JobError(
                        f"{block_name}.{name} has {width} outputs, not divisible into the "
                        f"{count} heads of {block_name}.{group.attention}"
                    )
        for neuron_group in neurons:
            where = f"FFN neurons of {block_name}.{neuron_group.consumer[0]}"
            _check_keeps_one(sparsity, neuron_group.width, where)
            for name, offset in neuron_group.producers:
                if linear_at(block, name).out_features < offset + neuron_group.width:
                    raise JobError(
                        f"{block_name}.{name} has fewer outputs than the {neuron_group.width} "
                        "FFN neurons its down-projection reads"
                    )


def _check_keeps_one(sparsity: float, units: int, what: str) -> None:
    removed = structured_count(units, sparsity)
    if removed >= units:
        raise JobError(
            f"sparsity={sparsity} would remove all {units} {what} (round({units} x {sparsity}) = "
            f"{removed}); structured pruning keeps at least one: use a sparsity below "
            f"{(units - 0.5) / units:.3f}"
        )


def _records_from_json(data: list[dict[str, Any]]) -> list[Any]:
    out: list[Any] = []
    for r in data:
        if "kind" in r:
            out.append(
                StructuredRecord(r["block"], r["group"], r["kind"], r["before"], r["removed"])
            )
        else:
            out.append(LayerRecord(r["name"], tuple(r["shape"]), r["pruned"], r["loss"]))
    return out


def check_previous_run(run_dir: Path, run_key: str) -> None:
    """Refuse a directory whose saved model or checkpoint belongs to another run (before
    anything is loaded; the apps also compare the whole config, `obsdiff.app.check_run_dir`)."""
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
            records=_records_from_json(progress["records"]),
            calibration_seconds=progress["calibration_seconds"],
            solve_seconds=progress["solve_seconds"],
            packages_done=int(progress["packages_done"]),
        )


def run_prune(job: PruneJob, run_dir: Path, parallel: DataParallel | None = None) -> dict[str, Any]:
    """Prune `job.model`, write the run directory, return the results (also in results.json).

    With `parallel` (one call per rank, a process group initialised), each rank calibrates on its
    share of the prompts; only rank 0 writes checkpoints and outputs. The checkpoint goes once
    the pruned model is saved, unless `job.keep_checkpoint`."""
    parallel = parallel or DataParallel.current()
    results = {"status": "completed", **prune_pipeline(job, run_dir, parallel)[1]}
    if parallel.is_main:
        write_json(run_dir / "results.json", results)
        if not job.keep_checkpoint:
            remove_checkpoint(run_dir)
    return results


def remove_checkpoint(run_dir: Path) -> None:
    """Delete the resume checkpoint of a finished run (a full copy of the denoiser)."""
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)


def prune_pipeline(
    job: PruneJob, run_dir: Path, parallel: DataParallel | None = None
) -> tuple[Any, dict[str, Any]]:
    """Prune and save (with `job.save`); return the pipeline holding the pruned denoiser (on
    job.device) and the results. Writes no results.json and keeps the checkpoint: the caller
    (`run_prune`, or the run app after its evaluation) records the finished run."""
    parallel = parallel or DataParallel.current()
    check_previous_run(run_dir, job.run_key)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pipe = job.model.load().to(job.device)
    pipe.set_progress_bar_config(disable=True)  # the package and batch bars say where we are
    denoiser = job.model.denoiser(pipe)
    structured = job.granularity.kind == "structured"
    packages, targets = plan_packages(job, denoiser)
    params_before = sum(p.numel() for p in denoiser.parameters())
    flops_before = pipeline_flops(pipe, denoiser, job.model.call_kwargs())
    step_weights = job.weighting.weights(job.model.sampling.num_inference_steps)

    checkpointer = Checkpointer(run_dir, job.run_key, denoiser, len(packages))
    previous = checkpointer.restore()
    embeddings = []
    shard = parallel.shard(len(job.prompts.prompts))
    if job.method.needs_calibration and previous.packages_done < len(packages):
        prompts = job.prompts.prompts[shard.start : shard.stop]
        embeddings = embed_batches(job.model, pipe, prompts, job.calibration.batch_size, job.device)

    def on_package_done(index: int, report: LoopReport) -> None:
        if parallel.is_main:
            checkpointer.save(index, _merged(previous, report))
        parallel.barrier()

    def prune_package(index: int, jobs: list[GroupJob]) -> list[Any]:
        if structured:
            return prune_structured_package(
                job.model, denoiser, packages[index], jobs, job.method, job.sparsity
            )
        assert job.pattern is not None
        return job.method.prune_groups(jobs, job.pattern)

    report = calibrate_and_prune(
        pipe,
        job.model,
        job.method,
        prune_package,
        packages,
        step_weights,
        embeddings,
        job.calibration,
        start_package=previous.packages_done,
        on_package_done=on_package_done,
        parallel=parallel,
        first_prompt=shard.start,
    )
    report = _merged(previous, report)

    params_after = sum(p.numel() for p in denoiser.parameters())
    results = {
        "model": job.model.name,
        "method": job.method.name,
        "granularity": job.granularity.name,
        "sparsity": job.sparsity,
        "achieved_sparsity": _achieved_sparsity(report, targets, structured),
        "packages": len(packages),
        "weighting": job.weighting.scheme,
        "params_before": params_before,
        "params_after": params_after,
        "tflops_before": flops_before / 1e12,
        "tflops_after": pipeline_flops(pipe, denoiser, job.model.call_kwargs()) / 1e12,
        "calibration_seconds": round(report.calibration_seconds, 4),
        "solve_seconds": round(report.solve_seconds, 4),
        "wall_seconds": round(time.perf_counter() - started, 4),
        "peak_memory_bytes": _peak_memory_bytes(job.device),
        "device": str(job.device),
    }
    if not structured:
        results["target_modules"] = len(targets)
        results["target_parameters"] = sum(m.weight.numel() for _, m in targets)
    results["world_size"] = parallel.world_size
    if parallel.is_main:
        if job.save:
            save_pruned(run_dir, denoiser, _manifest(job, results, report, packages, denoiser))
    parallel.barrier()
    log.info(
        "%s %s %.0f%%: achieved %.4f; parameters %d -> %d (calibration %.1f s, solve %.1f s)",
        job.method.name,
        job.granularity.name,
        100 * job.sparsity,
        results["achieved_sparsity"],
        params_before,
        params_after,
        report.calibration_seconds,
        report.solve_seconds,
    )
    return pipe, results


def _achieved_sparsity(
    report: LoopReport, targets: list[tuple[str, nn.Linear]], structured: bool
) -> float:
    """Unstructured / N:M: pruned weights over the target linears' weights. Structured: removed
    units (heads and neurons) over the units of the pruned groups."""
    if structured:
        before = sum(r.before for r in report.records)
        return sum(len(r.removed) for r in report.records) / before if before else 0.0
    total = sum(m.weight.numel() for _, m in targets)
    return sum(r.pruned for r in report.records) / total


def _merged(previous: LoopReport, current: LoopReport) -> LoopReport:
    return LoopReport(
        records=previous.records + current.records,
        calibration_seconds=previous.calibration_seconds + current.calibration_seconds,
        solve_seconds=previous.solve_seconds + current.solve_seconds,
        packages_done=current.packages_done,
    )


def _manifest(
    job: PruneJob,
    results: dict[str, Any],
    report: LoopReport,
    packages: list[list[UnitRef]],
    denoiser: nn.Module,
) -> dict[str, Any]:
    steps = job.model.sampling.num_inference_steps
    manifest = {
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
        "blocks": sorted({unit.block_index for p in packages for unit in p}),
        "calibration": {
            **job.prompts.describe(),
            "batch_size": job.calibration.batch_size,
            "seed": job.calibration.seed,
            "include_uncond": job.calibration.include_uncond,
            "hessian_precision": job.calibration.hessian_precision,
            "num_inference_steps": steps,
            "guidance_scale": job.model.sampling.guidance_scale,
            "resolution": [job.model.sampling.height, job.model.sampling.width],
        },
        "records": [r.as_dict() for r in report.records],
        "versions": {
            name: version(name) for name in ("obsdiff", "torch", "diffusers", "transformers")
        },
    }
    if job.granularity.kind == "structured":
        manifest["structure"] = shapes(denoiser)
    return manifest
