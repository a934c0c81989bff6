"""Pruned models on disk: safetensors weights plus a manifest, loaded back without unpickling.

A run directory holds `denoiser.safetensors` (the whole pruned denoiser state), `manifest.json`
(base model config, method, sparsity, weighting, packages, calibration set, per-layer records,
versions) and `config.yaml` (the resolved Hydra config). `load_pruned(run_dir)` rebuilds the base
pipeline from the manifest's model config (hub id, local path, or the tiny recipe built in code)
and loads the pruned denoiser into it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import yaml
from diffusers import DiffusionPipeline
from torch import nn

from obsdiff.models import adapter_for
from obsdiff.models.base import ModelAdapter, adapter_from_config
from obsdiff.surgery import restore_shapes
from obsdiff.utils.io import save_tensors, write_json


MANIFEST = "manifest.json"
WEIGHTS = "denoiser.safetensors"


def save_pruned(run_dir: Path, denoiser: nn.Module, manifest: dict[str, Any]) -> None:
    save_tensors(run_dir / WEIGHTS, denoiser.state_dict())
    write_json(run_dir / MANIFEST, manifest)


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        config = Path(run_dir) / "config.yaml"
        if config.is_file() and (yaml.safe_load(config.read_text()) or {}).get("save") is False:
            raise FileNotFoundError(
                f"{run_dir} was run with save=false: no pruned model was written there; prune "
                "again with save=true to evaluate or load it"
            )
        raise FileNotFoundError(
            f"{path} does not exist: {run_dir} is not the run directory of a finished prune"
        )
    return json.loads(path.read_text())


def load_pruned(
    run_dir: str | Path,
    pretrained: str | None = None,
    pipeline: DiffusionPipeline | None = None,
) -> tuple[DiffusionPipeline, ModelAdapter, dict[str, Any]]:
    """(pipeline with the pruned denoiser, its model adapter, the manifest), on the CPU.

    `pretrained` points at another copy of the base model (e.g. a local path on this machine);
    `pipeline` is the base pipeline itself, in memory (needed for a run of `obsdiff.api.prune`
    on a pipeline in memory, whose manifest names no source): its denoiser is replaced.
    """
    manifest = read_manifest(run_dir)
    model_config = dict(manifest["model_config"])
    if pipeline is not None:
        name = str(model_config.get("name", "in_memory"))
        adapter = adapter_for(pipeline, model_config.get("sampling"), name)
    elif "_target_" not in model_config:
        raise ValueError(
            f"{run_dir} pruned a pipeline in memory (obsdiff.api.prune): its manifest names no "
            "model to load; pass the base pipeline: load_pruned(run_dir, pipeline=<it>)"
        )
    else:
        if pretrained is not None:
            model_config["pretrained"] = pretrained
        adapter = adapter_from_config(model_config)
    pipe = adapter.load()
    denoiser = adapter.denoiser(pipe)
    if "structure" in manifest:  # structured: resize linears and head counts first
        restore_shapes(denoiser, manifest["structure"])
    state = safetensors.torch.load_file(str(Path(run_dir) / WEIGHTS))
    denoiser.load_state_dict(state, strict=True)
    return pipe, adapter, manifest
