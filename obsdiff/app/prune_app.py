"""The prune app's task (`python -m obsdiff.prune`, conf/prune.yaml): every setting is
validated before the model is loaded (`obsdiff.app.shell.execute`); the run directory receives
the pruned denoiser (safetensors), `manifest.json`, `results.json` and `config.yaml`.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from obsdiff.app.settings import build_prune_job, plan_only
from obsdiff.app.shell import RunContext, execute, run_dir, show_only
from obsdiff.artifacts.record import RunRecord
from obsdiff.oneshot.checkpoint import check_previous_run
from obsdiff.oneshot.job import PruneJob
from obsdiff.oneshot.plan import memory_plan
from obsdiff.oneshot.run import prune_pipeline


def prune(job: PruneJob, context: RunContext) -> RunRecord:
    job.device = context.device
    return RunRecord("completed", prune=prune_pipeline(job, context.out, context.parallel).result)


def task(cfg: DictConfig) -> float | None:
    """One prune job; returns the achieved sparsity (None when refused or only planned)."""
    if plan_only(cfg):  # the memory plan from the model's config files, no weights
        show_only(cfg, lambda: memory_plan(build_prune_job(cfg, reach_model=False)).table())
        return None

    def validate() -> tuple[PruneJob, torch.device]:
        job = build_prune_job(cfg)
        check_previous_run(run_dir(), job.run_key)  # a resume's checkpoint, readable
        return job, job.device

    record = execute(cfg, validate, prune)
    return None if record is None or record.prune is None else record.prune.achieved_sparsity
