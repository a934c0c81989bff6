"""`python -m obsdiff.evaluate`: evaluate a dense model config or a pruned run directory
(conf/evaluate.yaml).

    python -m obsdiff.evaluate model=sd3_medium eval=coco2014_5k
    python -m obsdiff.evaluate pruned=outputs/prune/runs/<time> eval=coco2014_5k

The run directory receives `eval/` (images, manifest, grid, metrics) and `results.json` with
an `eval` section and, for a pruned model, a `dense` section and the prune run's results.
Failures follow `obsdiff.app.execute`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from obsdiff.app import RunContext, build_eval, execute, identity
from obsdiff.config import CONF_DIR, instantiate_model, to_plain
from obsdiff.evaluation import EvalSettings, evaluate_dense, evaluate_pipeline
from obsdiff.models.base import ModelAdapter
from obsdiff.pruned import load_pruned, read_manifest
from obsdiff.utils.devices import resolve_device


def _pruned_identity(pruned_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The prune run's results (method, sparsity, ...), or what its manifest says."""
    results_file = pruned_dir / "results.json"
    if results_file.is_file():
        previous = json.loads(results_file.read_text())
        if previous.get("status") == "completed":
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


@dataclass
class Evaluation:
    model: ModelAdapter
    model_config: dict[str, Any]
    settings: EvalSettings
    pruned_dir: Path | None
    pretrained: str | None


def evaluate(job: Evaluation, dense_cache: Path, context: RunContext) -> dict[str, Any]:
    dense = None
    if job.settings.evaluate_dense or job.pruned_dir is None:
        dense = evaluate_dense(
            job.model, job.model_config, job.settings, dense_cache, context.device,
            context.parallel,
        )  # fmt: skip
    if job.pruned_dir is None:
        return {"eval": dense}
    pipe, _, _ = load_pruned(job.pruned_dir, job.pretrained)
    pipe = pipe.to(context.device)
    dense_images = None if dense is None else Path(dense["images_dir"])
    metrics = evaluate_pipeline(
        pipe, job.model, job.settings, context.out / "eval", context.parallel, dense_images
    )
    return {"eval": metrics, "dense": dense}


@hydra.main(config_path=str(CONF_DIR), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    names: dict[str, Any] = {**identity(cfg), "method": "dense", "sparsity": 0.0}
    pruned_dir = None if cfg.pruned is None else Path(str(cfg.pruned)).expanduser()
    pretrained = None if cfg.pretrained is None else str(cfg.pretrained)
    dense_cache = Path(cfg.paths.dense_cache)

    def validate() -> tuple[Evaluation, torch.device]:
        device = resolve_device(str(cfg.device))
        if pruned_dir is None:
            model_config = to_plain(cfg.model)
        else:
            manifest = read_manifest(pruned_dir)
            names.update(_pruned_identity(pruned_dir, manifest), pruned_run=str(pruned_dir))
            model_config = dict(manifest["model_config"])
            if pretrained is not None:
                model_config["pretrained"] = pretrained
        model = instantiate_model(OmegaConf.create(model_config))
        model.denoiser_skeleton()  # the model's files are reachable (a clear error if not)
        settings = build_eval(cfg.eval, str(device), dense_cache)
        return Evaluation(model, model_config, settings, pruned_dir, pretrained), device

    execute(cfg, validate, lambda job, context: evaluate(job, dense_cache, context), names)


if __name__ == "__main__":
    main()
