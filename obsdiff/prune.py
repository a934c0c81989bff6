"""`python -m obsdiff.prune`: prune a diffusion model with OBS-Diff or a baseline (conf/prune.yaml).

Every setting is validated before the model is loaded; the run directory receives the pruned
denoiser (safetensors), `manifest.json`, `results.json` and `config.yaml`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from obsdiff.calibration.prompts import BUNDLED_PROMPTS, PromptFileError, load_prompts
from obsdiff.calibration.sequential import CalibrationSettings
from obsdiff.config import CONF_DIR, ConfigError, instantiate, instantiate_model, to_plain
from obsdiff.methods.base import PruningMethod
from obsdiff.methods.granularity import Granularity
from obsdiff.pruning.schedules import TimestepWeighting
from obsdiff.runners.fabric import RunnerSettings, launch
from obsdiff.utils.devices import resolve_device
from obsdiff.workflow import JobError, PruneJob, run_prune


log = logging.getLogger(__name__)


def build_job(cfg: DictConfig) -> PruneJob:
    """Turn the composed config into a validated job (nothing is loaded here)."""
    calibration = cfg.calibration
    source = BUNDLED_PROMPTS if calibration.prompts == "bundled" else calibration.prompts
    prompts = load_prompts(
        source,
        num_prompts=calibration.num_prompts,
        fmt=calibration.format,
        column=calibration.column,
        selection=calibration.selection,
        seed=int(cfg.seed),
    )
    blocks = None if cfg.blocks is None else tuple(int(b) for b in cfg.blocks)
    if blocks is not None and len(blocks) != 2:
        raise ConfigError(f"blocks={list(blocks)} must be [start, end)")
    return PruneJob(
        model=instantiate_model(cfg.model),
        model_config=to_plain(cfg.model),
        method=instantiate(cfg.method, PruningMethod, "method"),  # type: ignore[type-abstract]
        granularity=instantiate(cfg.granularity, Granularity, "granularity"),
        sparsity=float(cfg.sparsity),
        weighting=instantiate(cfg.weighting, TimestepWeighting, "weighting"),
        packages=int(cfg.packages),
        prompts=prompts,
        calibration=CalibrationSettings(
            batch_size=int(calibration.batch_size),
            seed=int(cfg.seed),
            include_uncond=bool(calibration.include_uncond),
            hessian_precision=str(calibration.hessian_precision),
        ),
        device=resolve_device(str(cfg.device)),
        config=to_plain(cfg),
        blocks=blocks,  # type: ignore[arg-type]
        save=bool(cfg.save),
    )


@hydra.main(config_path=str(CONF_DIR), config_name="prune", version_base="1.3")
def main(cfg: DictConfig) -> float:
    try:
        job = build_job(cfg)
    except (ConfigError, JobError, PromptFileError, ValueError) as err:
        log.error("%s", err)
        sys.exit(2)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    runner = RunnerSettings(**OmegaConf.to_container(cfg.runner))  # type: ignore[arg-type]
    job.device, parallel = launch(runner, job.device)
    if parallel.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        results = run_prune(job, run_dir, parallel)
    except JobError as err:
        log.error("%s", err)
        sys.exit(2)
    return float(results["achieved_sparsity"])


if __name__ == "__main__":
    main()
