"""`python -m obsdiff.run`: prune, then evaluate the pruned and the dense model (conf/run.yaml).

The target of sweeps: `python -m obsdiff.run -m method=obsdiff,wanda sparsity=0.3,0.5`, then
`python -m obsdiff.report <sweep dir>`. The run directory receives what `obsdiff.prune` writes,
the pruned model's images and metrics under `eval/`, and `results.json` with the prune results,
an `eval` section (pruned) and a `dense` section (the dense model, cached under
`paths.dense_cache` and shared by every run of the same model and prompt set). Failures follow
`obsdiff.app.shell.execute`: a bad setting is refused before any work, a failed job of a sweep is
recorded in its results.json and the other jobs go on.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from obsdiff.app.config import CONF_DIR
from obsdiff.app.settings import build_eval, build_prune_job
from obsdiff.app.shell import RunContext, execute, show_only, timed_together
from obsdiff.artifacts.record import RunRecord
from obsdiff.eval.harness import EvalSettings, evaluate_dense, evaluate_pipeline
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


@hydra.main(config_path=str(CONF_DIR), config_name="run", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    if cfg.get("plan_only", False):  # the prune's memory plan, as the prune app prints it
        show_only(cfg, lambda: memory_plan(build_prune_job(cfg, reach_model=False)).table())
        return None
    dense_cache = Path(cfg.paths.dense_cache)

    def validate() -> tuple[tuple[PruneJob, EvalSettings], torch.device]:
        job = build_prune_job(cfg)
        settings = build_eval(cfg.eval, str(job.device), dense_cache)
        settings.prompts.check_disjoint(job.prompts.prompts)
        return (job, settings), job.device

    def work(built: tuple[PruneJob, EvalSettings], context: RunContext) -> RunRecord:
        return prune_and_evaluate(*built, dense_cache, context)

    record = execute(cfg, validate, work)
    return None if record is None or record.prune is None else record.prune.achieved_sparsity


if __name__ == "__main__":
    main()
