"""The run app's task (`python -m obsdiff.run`, conf/run.yaml): prune, then evaluate the pruned
and the dense model."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from obsdiff.app.settings import build_eval, build_prune_job, plan_only
from obsdiff.app.shell import RunContext, execute, run_dir, show_only, timed_together
from obsdiff.artifacts.record import RunRecord
from obsdiff.eval.harness import EvalSettings, evaluate_dense, evaluate_pipeline
from obsdiff.oneshot.checkpoint import check_previous_run
from obsdiff.oneshot.job import PruneJob
from obsdiff.oneshot.plan import memory_plan
from obsdiff.oneshot.run import prune_pipeline


def prune_and_evaluate(
    job: PruneJob, settings: EvalSettings, dense_cache: Path, context: RunContext
) -> RunRecord:
    job.device = context.device
    dense = None
    if settings.evaluate_dense:
        dense = evaluate_dense(
            job.model, job.model_config, settings, dense_cache, job.device, context.parallel
        )
    pruned = prune_pipeline(job, context.out, context.parallel)
    evaluation = evaluate_pipeline(
        pruned.pipeline, job.model, settings, context.out / "eval", context.parallel, dense
    )
    record = RunRecord("completed", prune=pruned.result, eval=evaluation, dense=dense)
    return timed_together(record, pruned.pipeline, job.model, settings, context)


def task(cfg: DictConfig) -> float | None:
    """One run: prune, then evaluate; returns the achieved sparsity (None: refused or planned)."""
    if plan_only(cfg):  # the prune's memory plan, as the prune app prints it
        show_only(cfg, lambda: memory_plan(build_prune_job(cfg, reach_model=False)).table())
        return None
    dense_cache = Path(cfg.paths.dense_cache)

    def validate() -> tuple[tuple[PruneJob, EvalSettings], torch.device]:
        job = build_prune_job(cfg)
        check_previous_run(run_dir(), job.run_key)  # a resume's checkpoint, readable
        settings = build_eval(cfg.eval, str(job.device), dense_cache)
        settings.prompts.check_disjoint(job.prompts.prompts)
        return (job, settings), job.device

    def work(built: tuple[PruneJob, EvalSettings], context: RunContext) -> RunRecord:
        return prune_and_evaluate(*built, dense_cache, context)

    record = execute(cfg, validate, work)
    return None if record is None or record.prune is None else record.prune.achieved_sparsity
