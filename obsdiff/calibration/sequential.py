"""The sequential calibrate-and-prune loop over module packages (paper Sec. 4.2).

For each package: attach hooks feeding one `InputStatistics` per input group, run every
calibration batch through the real pipeline (prompt embeddings computed once, reused by every
package), remove the hooks, prune the package, free its statistics, go on. Later packages see the
already pruned earlier ones. Methods that need no statistics (magnitude, dense) skip the passes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline
from torch import nn

from obsdiff.calibration.hooks import StatisticsHooks, StepTracker
from obsdiff.calibration.packages import UnitRef
from obsdiff.methods.base import GroupJob, PruningMethod
from obsdiff.models.base import ModelAdapter, linear_at
from obsdiff.pruning.statistics import InputStatistics
from obsdiff.runners.parallel import DataParallel
from obsdiff.utils.progress import progress
from obsdiff.utils.seeds import image_generators


log = logging.getLogger(__name__)


@dataclass
class CalibrationSettings:
    """How calibration passes run."""

    batch_size: int = 4
    seed: int = 0
    include_uncond: bool = True  # the reference code includes the CFG unconditional half
    hessian_precision: str = "float32"  # X^T X products: float32 | tf32 | bfloat16


PackagePruner = Callable[[int, list[GroupJob]], list[Any]]


@dataclass
class LoopReport:
    records: list[Any] = field(default_factory=list)  # what the package pruner reported
    calibration_seconds: float = 0.0
    solve_seconds: float = 0.0
    packages_done: int = 0


def package_jobs(
    denoiser: nn.Module,
    package: list[UnitRef],
    method: PruningMethod,
    product: str = "float32",
    adapter: ModelAdapter | None = None,
) -> list[GroupJob]:
    """One job per input group of the package, with fresh statistics if the method needs them
    and, with `adapter`, which of its linears belong to a feed-forward network."""
    jobs = []
    for unit in package:
        for group in unit.groups:
            names = [f"{unit.block_name}.{name}" for name in group]
            modules = [linear_at(denoiser, name) for name in names]
            stats = None
            if method.needs_calibration:
                stats = InputStatistics(
                    modules[0].in_features,
                    hessian=method.needs_hessian,
                    moments=method.needs_moments,
                    device=modules[0].weight.device,
                    product=product,
                )
            ffn = [adapter.is_ffn(name) for name in names] if adapter is not None else []
            jobs.append(GroupJob(names, modules, stats, ffn))
    return jobs


def statistics_bytes(denoiser: nn.Module, package: list[UnitRef], method: PruningMethod) -> int:
    """Memory the package's statistics will take, from the layer shapes alone."""
    total = 0
    for unit in package:
        for group in unit.groups:
            n = linear_at(denoiser, f"{unit.block_name}.{group[0]}").in_features
            total += 4 * (
                (n * n if method.needs_hessian else 0) + (3 * n if method.needs_moments else 0)
            )
    return total


def embed_batches(
    adapter: ModelAdapter,
    pipe: DiffusionPipeline,
    prompts: list[str],
    batch_size: int,
    device: torch.device,
) -> list[dict[str, torch.Tensor]]:
    """Prompt embeddings per calibration batch, computed once."""
    with torch.inference_mode():
        return [
            adapter.encode_prompts(pipe, prompts[start : start + batch_size], device)
            for start in range(0, len(prompts), batch_size)
        ]


def calibrate_and_prune(
    pipe: DiffusionPipeline,
    adapter: ModelAdapter,
    method: PruningMethod,
    prune_package: PackagePruner,
    packages: list[list[UnitRef]],
    step_weights: torch.Tensor,
    embeddings: list[dict[str, torch.Tensor]],
    settings: CalibrationSettings,
    start_package: int = 0,
    on_package_done: Callable[[int, LoopReport], None] | None = None,
    parallel: DataParallel | None = None,
    first_prompt: int = 0,
) -> LoopReport:
    """Run the loop from package `start_package` on. `prune_package(index, jobs)` prunes one
    calibrated package and returns its records; `on_package_done(index, report)` follows it.

    Data-parallel: `embeddings` hold this rank's prompts, the first of which is prompt number
    `first_prompt` of the whole set (its noise seed); the statistics are summed over the ranks
    before the package is solved, so every rank prunes with the statistics of all prompts."""
    parallel = parallel or DataParallel()
    denoiser = adapter.denoiser(pipe)
    tracker = StepTracker()
    report = LoopReport(packages_done=start_package)
    cfg_mode = adapter.cfg_mode()
    if method.needs_calibration:
        peak = max(statistics_bytes(denoiser, p, method) for p in packages)
        log.info(
            "%d packages; calibration statistics need at most %.1f MiB per package",
            len(packages),
            peak / 2**20,
        )
    for index in progress(range(start_package, len(packages)), "packages", "package"):
        jobs = package_jobs(denoiser, packages[index], method, settings.hessian_precision, adapter)
        started = time.perf_counter()
        if method.needs_calibration:
            hooks = StatisticsHooks(
                denoiser,
                [(job.modules[0], job.stats) for job in jobs if job.stats is not None],
                step_weights,
                tracker,
                cfg_mode=cfg_mode,
                include_uncond=settings.include_uncond,
            )
            with hooks.attached(), torch.inference_mode():
                offset = first_prompt
                desc = f"package {index + 1}/{len(packages)}"
                for batch in progress(embeddings, desc, "batch", leave=False):
                    count = next(iter(batch.values())).shape[0]
                    tracker.reset()
                    generators = image_generators(settings.seed, offset, count)
                    adapter.calibration_call(pipe, batch, generators, tracker.on_step_end)
                    offset += count
            parallel.all_reduce_(t for job in jobs if job.stats for t in job.stats.state_tensors())
        calibrated = time.perf_counter()
        with torch.no_grad():
            report.records.extend(prune_package(index, jobs))
        solved = time.perf_counter()
        report.calibration_seconds += calibrated - started
        report.solve_seconds += solved - calibrated
        report.packages_done = index + 1
        log.info(
            "package %d/%d: %d layers, calibration %.1f s, solve %.1f s",
            index + 1,
            len(packages),
            sum(len(job.modules) for job in jobs),
            calibrated - started,
            solved - calibrated,
        )
        del jobs
        if on_package_done is not None:
            on_package_done(index, report)
    return report
