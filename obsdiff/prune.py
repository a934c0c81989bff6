"""`python -m obsdiff.prune`: prune a diffusion model with OBS-Diff or a baseline (conf/prune.yaml).

Every setting is validated before the model is loaded (`obsdiff.app.execute`); the run directory
receives the pruned denoiser (safetensors), `manifest.json`, `results.json` and `config.yaml`.
"""

from __future__ import annotations

from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from obsdiff.app import RunContext, build_prune_job, execute
from obsdiff.config import CONF_DIR
from obsdiff.workflow import PruneJob, prune_pipeline


def prune(job: PruneJob, context: RunContext) -> dict[str, Any]:
    job.device = context.device
    return prune_pipeline(job, context.out, context.parallel)[1]


@hydra.main(config_path=str(CONF_DIR), config_name="prune", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    def validate() -> tuple[PruneJob, torch.device]:
        job = build_prune_job(cfg)
        return job, job.device

    results = execute(cfg, validate, prune)
    return None if results is None else float(results["achieved_sparsity"])


if __name__ == "__main__":
    main()
