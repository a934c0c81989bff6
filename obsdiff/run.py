"""`python -m obsdiff.run`: prune, then evaluate the pruned and the dense model (conf/run.yaml).

The target of sweeps: `python -m obsdiff.run -m method=obsdiff,wanda sparsity=0.3,0.5`, then
`python -m obsdiff.report <sweep dir>`. The run directory receives what `obsdiff.prune` writes,
the pruned model's images and metrics under `eval/`, and `results.json` with the prune results,
an `eval` section (pruned) and a `dense` section (the dense model, cached under
`paths.dense_cache` and shared by every run of the same model and prompt set). A failed run
records `status: failed` and its error in results.json; the other runs of a sweep go on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from obsdiff.app import (
    build_eval,
    build_logger,
    fail,
    record_run,
    run_dir,
)
from obsdiff.calibration.prompts import PromptFileError
from obsdiff.config import CONF_DIR, ConfigError
from obsdiff.eval.image_reward import ImageRewardUnavailable
from obsdiff.evaluation import evaluate_dense, evaluate_pipeline
from obsdiff.prune import build_job
from obsdiff.pruned import write_json
from obsdiff.runners.fabric import RunnerSettings, launch
from obsdiff.workflow import JobError, prune_pipeline


log = logging.getLogger(__name__)

SETTING_ERRORS = (ConfigError, JobError, PromptFileError, ValueError, FileNotFoundError)


def identity(cfg: DictConfig) -> dict[str, Any]:
    """What names a run in a sweep (also for a run that failed before anything was built)."""
    choices = HydraConfig.get().runtime.choices
    return {
        "model": choices.get("model"),
        "method": choices.get("method"),
        "granularity": choices.get("granularity"),
        "sparsity": cfg.sparsity,
        "weighting": choices.get("weighting"),
        "packages": cfg.packages,
        "eval_set": choices.get("eval"),
    }


@hydra.main(config_path=str(CONF_DIR), config_name="run", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    names = identity(cfg)
    try:
        job = build_job(cfg)
        settings = build_eval(cfg.eval, str(job.device), Path(cfg.paths.dense_cache))
        settings.prompts.check_disjoint(job.prompts.prompts)
    except (*SETTING_ERRORS, ImageRewardUnavailable) as err:
        fail(str(err), names)
    out = run_dir()
    runner = RunnerSettings(**OmegaConf.to_container(cfg.runner))  # type: ignore[arg-type]
    job.device, parallel = launch(runner, job.device)
    logger = None
    if parallel.is_main:
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        logger = build_logger(cfg.tracking, out, job.config, names)
    try:
        dense = None
        if settings.evaluate_dense:
            dense = evaluate_dense(
                job.model, job.model_config, settings, Path(cfg.paths.dense_cache), job.device,
                parallel,
            )  # fmt: skip
        pipe, pruned = prune_pipeline(job, out, parallel)
        dense_images = None if dense is None else Path(dense["images_dir"])
        metrics = evaluate_pipeline(pipe, job.model, settings, out / "eval", parallel, dense_images)
        results = {"status": "completed", **names, **pruned, "eval": metrics, "dense": dense}
        if parallel.is_main:
            record_run(out, results, logger)
    except JobError as err:
        fail(str(err), names)
    except Exception as err:
        write_json(out / "results.json", {"status": "failed", "error": repr(err), **names})
        raise
    finally:
        if logger is not None:
            logger.finish()
    return float(pruned["achieved_sparsity"])


if __name__ == "__main__":
    main()
