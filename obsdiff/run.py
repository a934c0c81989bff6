"""`python -m obsdiff.run`: prune, then evaluate the pruned and the dense model (conf/run.yaml).

The target of sweeps: `python -m obsdiff.run -m method=obsdiff,wanda sparsity=0.3,0.5`, then
`python -m obsdiff.report <sweep dir>`. The run directory receives what `obsdiff.prune` writes,
the pruned model's images and metrics under `eval/`, and `results.json` with the prune results,
an `eval` section (pruned) and a `dense` section (the dense model, cached under
`paths.dense_cache` and shared by every run of the same model and prompt set). Failures follow
`obsdiff.app.execute`: a bad setting is refused before any work, a failed job of a sweep is
recorded in its results.json and the other jobs go on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from obsdiff.app import RunContext, build_eval, build_prune_job, execute
from obsdiff.config import CONF_DIR
from obsdiff.evaluation import EvalSettings, evaluate_dense, evaluate_pipeline
from obsdiff.workflow import PruneJob, prune_pipeline


def prune_and_evaluate(
    job: PruneJob, settings: EvalSettings, dense_cache: Path, context: RunContext
) -> dict[str, Any]:
    job.device = context.device
    dense = None
    if settings.evaluate_dense:
        dense = evaluate_dense(
            job.model, job.model_config, settings, dense_cache, job.device, context.parallel
        )
    pipe, pruned = prune_pipeline(job, context.out, context.parallel)
    dense_images = None if dense is None else Path(dense["images_dir"])
    metrics = evaluate_pipeline(
        pipe, job.model, settings, context.out / "eval", context.parallel, dense_images
    )
    return {**pruned, "eval": metrics, "dense": dense}


@hydra.main(config_path=str(CONF_DIR), config_name="run", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    dense_cache = Path(cfg.paths.dense_cache)

    def validate() -> tuple[tuple[PruneJob, EvalSettings], torch.device]:
        job = build_prune_job(cfg)
        settings = build_eval(cfg.eval, str(job.device), dense_cache)
        settings.prompts.check_disjoint(job.prompts.prompts)
        return (job, settings), job.device

    def work(built: tuple[PruneJob, EvalSettings], context: RunContext) -> dict[str, Any]:
        return prune_and_evaluate(*built, dense_cache, context)

    results = execute(cfg, validate, work)
    return None if results is None else float(results["achieved_sparsity"])


if __name__ == "__main__":
    main()
