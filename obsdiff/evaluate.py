"""`python -m obsdiff.evaluate`: evaluate a dense model config or a pruned run directory
(conf/evaluate.yaml).

    python -m obsdiff.evaluate model=sd3_medium eval=coco2014_5k
    python -m obsdiff.evaluate pruned=outputs/prune/runs/<time> eval=coco2014_5k

The run directory receives `eval/` (images, manifest, grid, metrics) and `results.json` with
an `eval` section and, for a pruned model, a `dense` section and the prune run's results.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from obsdiff.app import build_eval, build_logger, fail, record_run, run_dir
from obsdiff.config import CONF_DIR, instantiate_model, to_plain
from obsdiff.eval.image_reward import ImageRewardUnavailable
from obsdiff.evaluation import evaluate_dense, evaluate_pipeline
from obsdiff.pruned import load_pruned, read_manifest, write_json
from obsdiff.run import SETTING_ERRORS
from obsdiff.runners.fabric import RunnerSettings, launch
from obsdiff.utils.devices import resolve_device


log = logging.getLogger(__name__)


def _pruned_identity(pruned_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The prune run's results (method, sparsity, ...), or what its manifest says."""
    results_file = pruned_dir / "results.json"
    if results_file.is_file():
        previous = json.loads(results_file.read_text())
        return {k: v for k, v in previous.items() if k not in ("eval", "dense", "status")}
    return {
        "model": manifest["model"]["name"],
        "method": manifest["method"]["name"],
        "granularity": manifest["granularity"],
        "sparsity": manifest["sparsity"],
        "achieved_sparsity": manifest["achieved_sparsity"],
        "weighting": manifest["weighting"].get("scheme"),
        "packages": manifest["packages"],
    }


@hydra.main(config_path=str(CONF_DIR), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    choices = HydraConfig.get().runtime.choices
    names: dict[str, Any] = {"model": choices.get("model"), "method": "dense", "sparsity": 0.0}
    pruned_dir = None if cfg.pruned is None else Path(str(cfg.pruned)).expanduser()
    try:
        device = resolve_device(str(cfg.device))
        if pruned_dir is None:
            model_config = to_plain(cfg.model)
        else:
            manifest = read_manifest(pruned_dir)
            names = _pruned_identity(pruned_dir, manifest) | {"pruned_run": str(pruned_dir)}
            model_config = dict(manifest["model_config"])
            if cfg.pretrained is not None:
                model_config["pretrained"] = str(cfg.pretrained)
        model = instantiate_model(OmegaConf.create(model_config))
        settings = build_eval(cfg.eval, str(device), Path(cfg.paths.dense_cache))
    except (*SETTING_ERRORS, ImageRewardUnavailable) as err:
        fail(str(err), names)
    out = run_dir()
    runner = RunnerSettings(**OmegaConf.to_container(cfg.runner))  # type: ignore[arg-type]
    device, parallel = launch(runner, device)
    logger = None
    if parallel.is_main:
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        logger = build_logger(cfg.tracking, out, to_plain(cfg), names)
    try:
        dense = None
        if settings.evaluate_dense or pruned_dir is None:
            dense = evaluate_dense(
                model, model_config, settings, Path(cfg.paths.dense_cache), device, parallel
            )
        if pruned_dir is None:
            results = {"status": "completed", **names, "eval": dense}
        else:
            pipe, _, _ = load_pruned(pruned_dir, cfg.pretrained)
            pipe = pipe.to(device)
            dense_images = None if dense is None else Path(dense["images_dir"])
            metrics = evaluate_pipeline(pipe, model, settings, out / "eval", parallel, dense_images)
            results = {"status": "completed", **names, "eval": metrics, "dense": dense}
        if parallel.is_main:
            record_run(out, results, logger)
    except Exception as err:
        write_json(out / "results.json", {"status": "failed", "error": repr(err), **names})
        raise
    finally:
        if logger is not None:
            logger.finish()


if __name__ == "__main__":
    main()
