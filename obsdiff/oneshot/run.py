"""A prune run: calibrate and prune package by package, checkpoint, save.

`prune_pipeline` runs a checked `PruneJob` (`obsdiff.oneshot.job`, built by the app from the
Hydra config or by `obsdiff.api.prune` from typed arguments). Re-running the same job on the
same directory resumes after the last finished package (`obsdiff.oneshot.checkpoint`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from torch import nn

from obsdiff.artifacts.pruned import PrunedModel, save_pruned
from obsdiff.artifacts.record import PruneResult
from obsdiff.calibration.cache import StatisticsCache, cache_key
from obsdiff.calibration.depth import prune_depth
from obsdiff.calibration.ecodiff import MaskResult, train_masks_for
from obsdiff.calibration.packages import UnitRef
from obsdiff.calibration.sequential import (
    LoopReport,
    calibrate_and_prune,
    embed_batches,
    peak_statistics_bytes,
    unit_groups,
)
from obsdiff.calibration.taylor import training_loss
from obsdiff.methods.depth import DepthCriterion
from obsdiff.methods.diff_pruning import DiffPruning
from obsdiff.methods.ecodiff import EcoDiff
from obsdiff.methods.package import (
    BlockRecord,
    Depth,
    LayerRecord,
    LowRankRecord,
    Structured,
    achieved_sparsity,
)
from obsdiff.models.experts import called_modules
from obsdiff.models.structure import linear_at
from obsdiff.models.surgery import shapes
from obsdiff.oneshot.checkpoint import Checkpointer, check_previous_run
from obsdiff.oneshot.job import JobError, PruneJob, depth_candidates, plan_packages
from obsdiff.prompts.image_folder import read_image_folder
from obsdiff.pruning.obs_structured import aligned_count
from obsdiff.pruning.taylor import TaylorScores, taylor_scores
from obsdiff.runners.parallel import DataParallel
from obsdiff.utils.flops import pipeline_flops
from obsdiff.utils.memory import peak_memory_bytes, reset_peak_memory


log = logging.getLogger(__name__)


def weights_hash(pipe: DiffusionPipeline) -> str:
    """sha256 of every weight of the pipeline's modules: the identity of a pipeline in memory,
    whose files (if any) say nothing of what was done to it since."""
    sha = hashlib.sha256()
    for name, component in sorted(pipe.components.items()):
        if isinstance(component, nn.Module):
            for key, tensor in sorted(component.state_dict().items()):
                sha.update(f"{name}.{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
                flat = tensor.detach().cpu().contiguous().reshape(-1)
                sha.update(flat.view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()[:16]


def prune_pipeline(
    job: PruneJob, run_dir: Path, parallel: DataParallel | None = None
) -> PrunedModel:
    """Load `job.model`, prune it package by package and save it into `run_dir` (with
    `job.save`); return the pruned pipeline (on job.device), its manifest and its figures.

    `run_dir` also holds the resume checkpoint, written after each package and left for the
    caller to remove (`remove_checkpoint`) once the run is recorded. With `parallel` (one call
    per rank, a process group initialised), each rank calibrates on its share of the prompts;
    only rank 0 writes."""
    parallel = parallel or DataParallel.current()
    check_previous_run(run_dir, job.run_key)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    reset_peak_memory(job.device)
    pipe = job.model.load().to(job.device)
    pipe.set_progress_bar_config(disable=True)  # the package and batch bars say where we are
    denoiser = job.model.denoiser(pipe)
    packages, targets = plan_packages(job, denoiser)
    params_before = sum(p.numel() for p in denoiser.parameters())
    flops_before = pipeline_flops(pipe, called_modules(denoiser), job.model.call_kwargs())
    experts = job.model.expert_steps(pipe)
    by_expert = expert_weights(job, experts, job.model.denoising_steps(pipe))
    step_weights = next(iter(by_expert.values()))  # one denoiser's (depth pruning's)
    statistics_peak = peak_statistics_bytes(
        denoiser, packages, job.method, cached_first=job.statistics_cache is not None
    )
    if job.method.needs_calibration:
        log.info(
            "%d packages; calibration statistics need at most %.1f MiB per package",
            len(packages),
            statistics_peak / 2**20,
        )

    checkpointer = Checkpointer(run_dir, job.run_key, denoiser, len(packages))
    previous = checkpointer.restore()
    first_pass = None  # a gradient method's: what the manifest says of it
    if job.method.needs_gradients and previous.packages_done < len(packages):
        first_pass = scoring_pass(
            job, pipe, denoiser, packages, dict(targets), checkpointer, parallel.is_main
        )
    embeddings = []
    shard = parallel.shard(len(job.prompts.prompts))
    depth = isinstance(job.target, Depth)
    if job.calibrates and (depth or previous.packages_done < len(packages)):
        prompts = job.prompts.prompts[shard.start : shard.stop]
        embeddings = embed_batches(job.model, pipe, prompts, job.calibration.batch_size, job.device)

    def on_package_done(index: int, report: LoopReport) -> None:
        if parallel.is_main:
            checkpointer.save(index, _merged(previous, report))
        parallel.barrier()

    cache, key = None, None
    if job.statistics_cache is not None and job.method.needs_calibration:
        cache = StatisticsCache(job.statistics_cache)
        weights = None if job.model.pipeline is None else weights_hash(pipe)
        key = cache_key(job.first_package_identity(packages[0], parallel.world_size, weights))
    if depth:  # one pass of the criterion, then the blocks go
        assert isinstance(job.method, DepthCriterion)  # the job checked the granularity
        candidates, count = depth_candidates(job, denoiser)
        scored = time.perf_counter()
        records = prune_depth(
            pipe, job.model, job.method, candidates, count, step_weights, embeddings,
            job.calibration.seed, parallel, shard.start, job.modulation,
        )  # fmt: skip
        seconds = round(time.perf_counter() - scored, 4)
        report = LoopReport(list(records), calibration_seconds=seconds)
    else:
        report = calibrate_and_prune(
            pipe,
            job.model,
            job.method,
            job.target,
            packages,
            by_expert,
            embeddings,
            job.calibration,
            job.placement,
            start_package=previous.packages_done,
            on_package_done=on_package_done,
            parallel=parallel,
            first_prompt=shard.start,
            cache=cache,
            cache_key=key,
            modulation=job.modulation,
        )
        report = _merged(previous, report)
    factorised = [r for r in report.records if isinstance(r, LowRankRecord)]
    if factorised:
        log.info(
            "low-rank modulation: %d of %d linears factorised, %d parameters fewer",
            sum(r.parameters_saved > 0 for r in factorised), len(factorised),
            sum(r.parameters_saved for r in factorised),
        )  # fmt: skip

    untouched = not targets  # structured and depth: units are heads and neurons, or blocks
    result = PruneResult(
        achieved_sparsity=achieved_sparsity(report.records),
        packages=len(packages),
        params_before=params_before,
        params_after=sum(p.numel() for p in denoiser.parameters()),
        tflops_before=flops_before / 1e12,
        tflops_after=pipeline_flops(pipe, called_modules(denoiser), job.model.call_kwargs()) / 1e12,
        calibration_seconds=round(report.calibration_seconds, 4),
        solve_seconds=round(report.solve_seconds, 4),
        wall_seconds=round(time.perf_counter() - started, 4),
        peak_memory_bytes=peak_memory_bytes(job.device),
        device=str(job.device),
        world_size=parallel.world_size,
        target_modules=None if untouched else len(targets),
        target_parameters=None if untouched else sum(m.weight.numel() for _, m in targets),
        target_nonzero=None if untouched else sum(_nonzero(m) for _, m in targets),
        layer_loss=_layer_loss(report),
        statistics_bytes=statistics_peak,
    )
    manifest = _manifest(job, result, report, packages, denoiser)
    if first_pass is not None:  # Taylor levels and losses, or the masks' trainings
        manifest.update(first_pass)
    if list(experts) != [""]:  # the steps each expert ran, and their weights
        manifest["experts"] = {
            name: {"steps": steps, "weights": [round(float(by_expert[name][i]), 6) for i in steps]}
            for name, steps in experts.items()
        }
    pruned = PrunedModel(pipe, job.model, manifest, result)
    if parallel.is_main and job.save:
        save_pruned(pruned, run_dir)
    parallel.barrier()
    nonzero = ""
    if result.target_parameters is not None and result.target_nonzero is not None:
        nonzero = f"; target layers {result.target_parameters} -> {result.target_nonzero} non-zero"
    log.info(
        "%s %s %.0f%%: achieved %.4f; parameters %d -> %d%s (calibration %.1f s, solve %.1f s)",
        job.method.name,
        job.granularity.name,
        100 * job.sparsity,
        result.achieved_sparsity,
        result.params_before,
        result.params_after,
        nonzero,
        report.calibration_seconds,
        report.solve_seconds,
    )
    return pruned


def scoring_pass(
    job: PruneJob,
    pipe: DiffusionPipeline,
    denoiser: nn.Module,
    packages: list[list[UnitRef]],
    targets: dict[str, nn.Linear],
    checkpointer: Checkpointer,
    keep: bool = True,
) -> dict[str, Any]:
    """A gradient method's pass before the packages, on the dense model (Diff-Pruning's Taylor
    scores, EcoDiff's masks), handed to the method; kept in the checkpoint (by the process
    that writes, `keep`: rank 0), so that a resume reads it instead of computing it again on a
    partly pruned model. Returns the manifest's section about it."""
    method = job.method
    kept = checkpointer.restore_scores()
    if isinstance(method, EcoDiff):
        if kept is None:
            result = mask_pass(job, pipe, denoiser, packages)
            info: dict[str, Any] = {
                "beta": result.beta,
                "trainings": [list(t) for t in result.trainings],
                "losses": [round(v, 6) for v in result.losses],
            }
            kept = (result.logits, info)
            if keep:
                checkpointer.save_scores(*kept)
        method.use_logits(kept[0])
        return {"ecodiff": kept[1]}
    assert isinstance(method, DiffPruning)  # the other method that reads gradients
    if kept is None:
        scores = taylor_pass(job, pipe, denoiser, packages, targets)
        losses = [round(v, 6) for v in scores.losses]
        kept = (scores.as_tensors(), {"levels": scores.levels, "losses": losses})
        if keep:
            checkpointer.save_scores(*kept)
    tensors, about = kept
    method.use_scores(TaylorScores.from_tensors(tensors, about["levels"], about["losses"]))
    return {"taylor": about}


def taylor_pass(
    job: PruneJob,
    pipe: DiffusionPipeline,
    denoiser: nn.Module,
    packages: list[list[UnitRef]],
    targets: dict[str, nn.Linear],
) -> TaylorScores:
    """Diff-Pruning's scores of the dense model's target linears, on one batch of the
    calibration prompts: per weight for a pattern prune; per row and column of every producer
    and consumer of the head and neuron groups for a structured one."""
    method = job.method
    assert isinstance(method, DiffPruning)
    structured = isinstance(job.target, Structured)
    if structured:
        targets = {
            name: linear_at(denoiser, name)
            for group in unit_groups(job.model, denoiser, packages)
            for name, _ in group.producers + group.consumers
        }
    prompts = job.prompts.prompts[: job.calibration.batch_size]
    images = None  # one batch of the folder's images, as the official code's one batch
    if method.images is not None:
        images = read_image_folder(method.images, "method.images")[: job.calibration.batch_size]
    loss_at = training_loss(job.model, pipe, prompts, method.levels, job.calibration.seed, images)
    return taylor_scores(
        denoiser, targets, loss_at, method.threshold, method.levels, per_weight=not structured
    )


def mask_pass(
    job: PruneJob, pipe: DiffusionPipeline, denoiser: nn.Module, packages: list[list[UnitRef]]
) -> MaskResult:
    """EcoDiff's gates of every head and neuron group the packages prune, trained on the
    calibration prompts (beta bisected to the units the sparsity removes)."""
    method = job.method
    assert isinstance(method, EcoDiff) and isinstance(job.target, Structured)
    groups = unit_groups(job.model, denoiser, packages)
    counts = [aligned_count(g.units, job.sparsity, g.unit_width, job.target.align) for g in groups]
    embeddings = embed_batches(
        job.model, pipe, job.prompts.prompts, job.calibration.batch_size, job.device
    )
    return train_masks_for(
        job.model, pipe, groups, counts, embeddings, method, job.calibration.seed
    )


def _nonzero(module: nn.Module) -> int:
    return int(torch.count_nonzero(module.weight))  # type: ignore[arg-type]


def _layer_loss(report: LoopReport) -> float | None:
    """The summed layer-wise reconstruction losses the method reported (OBS), else None."""
    losses = [r.loss for r in report.records if isinstance(r, LayerRecord) and r.loss is not None]
    return float(sum(losses)) if losses else None


def _merged(previous: LoopReport, current: LoopReport) -> LoopReport:
    return LoopReport(
        records=previous.records + current.records,
        calibration_seconds=previous.calibration_seconds + current.calibration_seconds,
        solve_seconds=previous.solve_seconds + current.solve_seconds,
        packages_done=current.packages_done,
    )


def expert_weights(
    job: PruneJob, experts: dict[str, list[int]], num_steps: int
) -> dict[str, torch.Tensor]:
    """alpha_t (T,) per denoiser: one denoiser's over all T steps (key ""); each timestep
    expert's the weighting scheme over its own steps alone (explicit weights: those of its
    steps), placed at them (zero at the steps another expert runs, where its hooks never fire).
    JobError for an expert given no step."""
    if list(experts) == [""]:
        return {"": job.weighting.step_weights(num_steps)}
    weights = {}
    for name, steps in experts.items():
        if not steps:
            raise JobError(
                f"model.sampling.num_inference_steps={num_steps} gives expert {name} no "
                "denoising step to calibrate on; use more steps"
            )
        alpha = torch.zeros(num_steps, dtype=torch.float64)
        if job.weighting.scheme == "explicit":  # given per step of the whole trajectory
            alpha[steps] = job.weighting.step_weights(num_steps)[steps].to(torch.float64)
        else:
            alpha[steps] = job.weighting.step_weights(len(steps)).to(torch.float64)
        weights[name] = alpha
    return weights


def _manifest(
    job: PruneJob,
    result: PruneResult,
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
        "achieved_sparsity": result.achieved_sparsity,
        "weighting": job.weighting.describe(steps),
        "packages": len(packages),
        "package_units": [len(p) for p in packages],
        "blocks": sorted({unit.block_index for p in packages for unit in p}),
        "calibration": {
            **job.prompts.describe(),
            **job.calibration.run_settings(),
            "num_inference_steps": steps,
            "guidance_scale": job.model.sampling.guidance_scale,
            "resolution": [job.model.sampling.height, job.model.sampling.width],
        },
        "records": [r.as_dict() for r in report.records],
        "versions": {
            name: version(name) for name in ("obsdiff", "torch", "diffusers", "transformers")
        },
    }
    if job.modulation is not None:
        manifest["modulation"] = job.modulation.describe()
    if isinstance(job.target, Structured | Depth) or job.modulation is not None:
        structure = shapes(denoiser)  # new widths, head counts, ranks: for loading
        if isinstance(job.target, Depth):  # the original names of the blocks that went
            records = [r for r in report.records if isinstance(r, BlockRecord) and r.removed]
            structure["removed_blocks"] = [r.name for r in records]
        manifest["structure"] = structure
    return manifest
