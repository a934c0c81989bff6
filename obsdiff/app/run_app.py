"""The run app's task (`python -m obsdiff.run`, conf/run.yaml): prune, optionally recover
(`recover=distill`), then evaluate the pruned and the dense model."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from obsdiff.app.config import settings as typed
from obsdiff.app.settings import (
    build_eval,
    build_prune_job,
    check_lora_width,
    check_recoverable,
    check_recovery_resume,
    plan_only,
)
from obsdiff.app.shell import RunContext, execute, run_dir, show_only, timed_together
from obsdiff.artifacts.pruned import save_pruned
from obsdiff.artifacts.record import RunRecord
from obsdiff.eval.harness import EvalSettings, check_evaluable, evaluate_dense, evaluate_pipeline
from obsdiff.oneshot.checkpoint import check_previous_run
from obsdiff.oneshot.job import PruneJob
from obsdiff.oneshot.plan import memory_plan
from obsdiff.oneshot.run import prune_pipeline
from obsdiff.recovery.plan import recovery_plan
from obsdiff.recovery.run import recover_pruned
from obsdiff.recovery.settings import RecoverySettings


def prune_and_evaluate(
    job: PruneJob,
    recovery: RecoverySettings | None,
    settings: EvalSettings,
    dense_cache: Path,
    context: RunContext,
) -> RunRecord:
    """Prune; with `recovery`, distil the pruned model towards a fresh copy of the dense one on
    the calibration prompts (the run directory's weights are then the recovered ones); then
    evaluate."""
    job.device = context.device
    dense = None
    if settings.evaluate_dense:
        dense = evaluate_dense(
            job.model, job.model_config, settings, dense_cache, job.device, context.parallel
        )
    pruned = prune_pipeline(job, context.out, context.parallel)
    if recovery is not None:  # the pruned pipeline waits on the CPU: the device holds the plan
        pruned.pipeline.to("cpu")
        pruned = recover_pruned(
            pruned, job.model.load(), job.prompts.prompts, recovery, context.device,
            job.calibration.batch_size, context.out,
            None if context.logger is None else [context.logger.lightning()], context.parallel,
        )  # fmt: skip
        pruned.pipeline.to(context.device)
        if context.parallel.is_main and job.save:
            save_pruned(pruned, context.out)
    evaluation = evaluate_pipeline(
        pruned.pipeline, job.model, settings, context.out / "eval", context.parallel, dense
    )
    record = RunRecord(
        "completed", prune=pruned.result, recover=pruned.recovery, eval=evaluation, dense=dense
    )
    return timed_together(record, pruned.pipeline, job.model, settings, context)


def plans(cfg: DictConfig) -> str:
    """The prune's memory plan, and the recovery's with `recover=<option>`."""
    job = build_prune_job(cfg, reach_model=False)
    components = job.model.component_skeletons()
    text = memory_plan(job, components).table()
    if cfg.recover is not None:
        recovery = typed(cfg.recover, RecoverySettings, "recover.")
        plan = recovery_plan(job.model, recovery, job.calibration.batch_size, components)
        text += "\n" + plan.table()
    return text


def task(cfg: DictConfig) -> float | None:
    """One run: prune, then evaluate; returns the achieved sparsity (None: refused or planned)."""
    if plan_only(cfg):  # the prune's memory plan, as the prune app prints it; the recovery's
        show_only(cfg, lambda: plans(cfg))
        return None
    dense_cache = Path(cfg.paths.dense_cache)

    Built = tuple[PruneJob, RecoverySettings | None, EvalSettings]

    def validate() -> tuple[Built, torch.device]:
        job = build_prune_job(cfg)
        check_previous_run(run_dir(), job.run_key)  # a resume's checkpoint, readable
        recovery = None
        if cfg.recover is not None:
            recovery = typed(cfg.recover, RecoverySettings, "recover.")
            check_recovery_resume(job.run_key, job.prompts.prompts, recovery)
            check_recoverable(job.model)
            if recovery.lora_rank:  # at the dense widths (a structured prune checks again)
                check_lora_width(job.model, {}, recovery.lora_rank)
        settings = build_eval(cfg.eval, str(job.device), dense_cache)
        check_evaluable(job.model, settings)
        settings.prompts.check_disjoint(job.prompts.prompts)
        return (job, recovery, settings), job.device

    def work(built: Built, context: RunContext) -> RunRecord:
        return prune_and_evaluate(*built, dense_cache, context)

    record = execute(cfg, validate, work)
    return None if record is None or record.prune is None else record.prune.achieved_sparsity
