"""`python -m obsdiff.prune`: prune a diffusion model with OBS-Diff or a baseline (conf/prune.yaml).

Every setting is validated before the model is loaded (`obsdiff.app.shell.execute`); the run
directory receives the pruned denoiser (safetensors), `manifest.json`, `results.json` and
`config.yaml`.
"""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig

from obsdiff import api
from obsdiff.app.config import CONF_DIR
from obsdiff.app.entry import callable_module
from obsdiff.app.settings import build_prune_job
from obsdiff.app.shell import RunContext, execute, show_only
from obsdiff.artifacts.record import RunRecord
from obsdiff.oneshot.job import PruneJob
from obsdiff.oneshot.plan import memory_plan
from obsdiff.oneshot.run import prune_pipeline


def prune(job: PruneJob, context: RunContext) -> RunRecord:
    job.device = context.device
    return RunRecord("completed", prune=prune_pipeline(job, context.out, context.parallel).result)


@hydra.main(config_path=str(CONF_DIR), config_name="prune", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    if cfg.get("plan_only", False):  # the memory plan from the model's config files, no weights
        show_only(cfg, lambda: memory_plan(build_prune_job(cfg, reach_model=False)).table())
        return None

    def validate() -> tuple[PruneJob, torch.device]:
        job = build_prune_job(cfg)
        return job, job.device

    record = execute(cfg, validate, prune)
    return None if record is None or record.prune is None else record.prune.achieved_sparsity


callable_module(__name__, api.prune)  # `obsdiff.prune(...)` is the Python API's

if __name__ == "__main__":
    main()
