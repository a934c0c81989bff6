"""Pruned models on disk: safetensors weights plus a manifest, loaded back without unpickling.

A pruned model's directory holds `denoiser.safetensors` (the whole pruned denoiser state) and
`manifest.json` (base model config, method, sparsity, weighting, packages, calibration set,
per-layer records, versions); a run of the apps adds `config.yaml` and `results.json`.
`load_pruned(run_dir)` rebuilds the base pipeline from the manifest's model config (hub id,
local path, or the tiny recipe built in code) and loads the pruned denoiser into it.

A quantized run (`obsdiff.quantize`, or the run app's `quantize=` stage) holds the same weights
in the model's dtype and the quantization in its manifest (`quantize`): `load_pruned` quantizes
the loaded denoiser as the run did (deterministic, and no pickle of a quantized tensor).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import yaml
from diffusers import DiffusionPipeline
from torch import nn

from obsdiff.artifacts.record import PruneResult, RecoveryResult
from obsdiff.models import adapter_for
from obsdiff.models.base import ModelAdapter, adapter_from_config
from obsdiff.models.sparse import check_sparse_kernels, use_sparse_kernels
from obsdiff.quantization import (
    QuantizeError,
    QuantizeResult,
    QuantizeSettings,
    check_device,
    check_widths,
    linear_widths,
    quantize_denoiser,
)
from obsdiff.utils.file_checks import safetensors_problem
from obsdiff.utils.io import save_tensors, write_json


MANIFEST = "manifest.json"
WEIGHTS = "denoiser.safetensors"


@dataclass
class PrunedModel:
    """A pruned pipeline with its adapter and manifest: what `obsdiff.prune` returns and
    `load_pruned` gives back. `result`: the prune run's figures (None when loaded)."""

    pipeline: DiffusionPipeline
    adapter: ModelAdapter
    manifest: dict[str, Any]
    result: PruneResult | None = None
    recovery: RecoveryResult | None = None  # what `obsdiff.recover` did (None when loaded)
    quantization: QuantizeResult | None = None  # what the quantization did (also when loaded)

    @property
    def denoiser(self) -> nn.Module:
        return self.adapter.denoiser(self.pipeline)


def save_pruned(pruned: PrunedModel, run_dir: str | Path) -> Path:
    """Write the pruned denoiser (safetensors) and its manifest into `run_dir`; returns it.
    A quantized one is saved before it is quantized (`quantize_pruned` says how)."""
    if pruned.quantization is not None:
        raise ValueError(
            "the denoiser is quantized: save the pruned model before quantizing it, then "
            "quantize_pruned(pruned, settings, run_dir) records the quantization in its manifest"
        )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(run_dir / WEIGHTS, pruned.denoiser.state_dict())
    write_json(run_dir / MANIFEST, pruned.manifest)
    return run_dir


def quantize_pruned(
    pruned: PrunedModel, settings: QuantizeSettings, run_dir: str | Path | None = None
) -> QuantizeResult:
    """Quantize the pruned model's denoiser in place and record it in its manifest (and, with
    `run_dir`, in that run's `manifest.json`: the weights saved there, in the model's dtype,
    load quantized). Once only: a quantized model is not quantized again."""
    if pruned.quantization is not None or "quantize" in pruned.manifest:
        raise ValueError(
            f"the model is quantized already ({pruned.manifest.get('quantize', {}).get('scheme')})"
            ": quantize the pruned run it came from"
        )
    result = quantize_denoiser(pruned.adapter, pruned.denoiser, settings)
    pruned.quantization = result
    pruned.manifest["quantize"] = {**settings.as_dict(), "name": settings.name}
    if run_dir is not None:
        write_json(Path(run_dir) / MANIFEST, pruned.manifest)
    return result


def quantize_settings(manifest: dict[str, Any]) -> QuantizeSettings | None:
    """The quantization a run's manifest records (None: not quantized)."""
    recorded = manifest.get("quantize")
    if recorded is None:
        return None
    return QuantizeSettings(
        scheme=recorded["scheme"], group_size=recorded.get("group_size"),
        keep_out=recorded.get("keep_out", True),
    )  # fmt: skip


def check_quantizable(
    run_dir: str | Path,
    settings: QuantizeSettings,
    device: str | torch.device,
    pretrained: str | None = None,
) -> dict[str, Any]:
    """Every check of quantizing the pruned model of `run_dir`, before anything loads: its
    weights are there (`check_pruned_run`), it names its model and is not quantized yet, the
    device takes the scheme, and an int4 group size divides the input width of every linear
    to be quantized (from the architecture, cut as the run cut it). Returns its manifest;
    `PrunedRunError` or `QuantizeError` otherwise."""
    manifest = check_pruned_run(run_dir)
    recorded = quantize_settings(manifest)
    if recorded is not None:
        raise QuantizeError(
            f"pruned={run_dir} is quantized already ({recorded.name}); quantize the run it "
            f"came from ({manifest.get('quantized_from', 'its source run')})"
        )
    if "_target_" not in manifest["model_config"]:
        raise QuantizeError(
            f"pruned={run_dir} pruned a pipeline in memory: its manifest names no model to "
            "load; quantize it from Python: obsdiff.quantize(obsdiff.load_pruned(run_dir, "
            "pipeline=<base>), ...)"
        )
    check_device(settings, device)
    check_group_size(manifest, settings, pretrained)
    return manifest


def check_group_size(
    manifest: dict[str, Any], settings: QuantizeSettings, pretrained: str | None = None
) -> None:
    """QuantizeError unless an int4 group size divides the input width of every linear the
    quantization reaches, in the run's model (its architecture, cut as the run cut it)."""
    if settings.group_size is None:
        return
    adapter = adapter_from_config(base_config(manifest["model_config"], pretrained))
    skeleton = adapter.denoiser_skeleton()
    if "structure" in manifest:
        adapter.restore_structure(skeleton, manifest["structure"])
    check_widths(settings, linear_widths(adapter, skeleton, settings.keep_out))


class PrunedRunError(ValueError):
    """A directory whose pruned model cannot be loaded; found before anything is loaded."""


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The manifest of the pruned model in `run_dir` (`PrunedRunError` when there is none or it
    cannot be read). `check_pruned_run` also checks the weights."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        config = Path(run_dir) / "config.yaml"
        if config.is_file() and _saved_nothing(config):
            raise PrunedRunError(
                f"{run_dir} was run with save=false: no pruned model was written there; prune "
                "again with save=true to evaluate or load it"
            )
        raise PrunedRunError(
            f"{path} does not exist: {run_dir} is not the run directory of a finished prune"
        )
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PrunedRunError(
            f"{path} cannot be read ({err}): the run's pruned model cannot be loaded; prune "
            "again into a new run directory"
        ) from None
    if not isinstance(manifest, dict) or "model_config" not in manifest:
        raise PrunedRunError(f"{path} is not an obsdiff manifest (no model_config)")
    return manifest


def _saved_nothing(config: Path) -> bool:
    try:
        settings = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError:
        return False
    return isinstance(settings, dict) and settings.get("save") is False


def check_pruned_run(run_dir: str | Path) -> dict[str, Any]:
    """The manifest of `run_dir` once its pruned model is known to load: the manifest reads and
    `denoiser.safetensors` is there with an intact header that matches its size (no tensor is
    read). One `PrunedRunError` naming the file and the fix otherwise."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PrunedRunError(f"{run_dir} is not a directory: give the run directory of a prune")
    manifest = read_manifest(run_dir)
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise PrunedRunError(
            f"{run_dir} holds no {WEIGHTS}: the run did not save its pruned weights; prune again "
            "with save=true"
        )
    problem = safetensors_problem(weights)
    if problem is not None:
        raise PrunedRunError(
            f"{weights} is damaged ({problem}), e.g. cut short by a full disk or an interrupted "
            "copy: copy it again from where it came from, or prune again into a new run directory"
        )
    return manifest


def base_config(model_config: dict[str, Any], pretrained: str | None) -> dict[str, Any]:
    """The model config of a pruned run's base model, loaded from `pretrained` (another copy of
    it: a hub id or a local path) where given, in place of the checkpoint or tiny recipe the
    run named."""
    if pretrained is None:
        return dict(model_config)
    return {**model_config, "pretrained": pretrained, "tiny": None}


def check_same_base(base: ModelAdapter, other: ModelAdapter, key: str) -> None:
    """`other` has the denoiser architecture of `base` (every weight's name and shape, from
    their config files: nothing is loaded); else ValueError naming `key` and the fix. Weights
    of the same shapes from another training are not detected."""
    mine = {n: tuple(p.shape) for n, p in base.denoiser_skeleton().named_parameters()}
    theirs = {n: tuple(p.shape) for n, p in other.denoiser_skeleton().named_parameters()}
    if mine == theirs:
        return
    differing = sorted(set(mine) ^ set(theirs)) or sorted(n for n in mine if mine[n] != theirs[n])
    first = differing[0]
    raise ValueError(
        f"{key}={other.pretrained} is not the pruned model's base ({base.name}): its "
        f"{base.denoiser_attr} has {len(theirs)} weights against {len(mine)}, {len(differing)} "
        f"differing, e.g. {first} {theirs.get(first, 'absent')} against {mine.get(first, 'absent')}"
        f"; give a copy of {base.pretrained or base.name}"
    )


def load_pruned(
    run_dir: str | Path,
    pretrained: str | None = None,
    pipeline: DiffusionPipeline | None = None,
    *,
    sparse_kernels: bool = False,
    device: str | torch.device | None = None,
    quantized: bool = True,
) -> PrunedModel:
    """The pipeline with the pruned denoiser, its model adapter and the manifest, on the CPU
    (or on `device`).

    `pretrained` points at another copy of the base model (e.g. a local path on this machine);
    `pipeline` is the base pipeline itself, in memory (needed for a run of `obsdiff.api.prune`
    on a pipeline in memory, whose manifest names no source): its denoiser is replaced.
    `sparse_kernels` (a 2:4 model, `device` CUDA, fp16/bf16): the pruned linears as 2:4
    semi-structured sparse weights (`obsdiff.models.sparse`). A quantized run is quantized as
    it was, unless `quantized=False` (the weights as saved, in the model's dtype). The run
    directory (`check_pruned_run`) and the kernels are checked before anything loads.
    """
    manifest = check_pruned_run(run_dir)
    model_config = dict(manifest["model_config"])
    quantization = quantize_settings(manifest) if quantized else None
    if sparse_kernels and quantization is not None:
        raise ValueError(
            f"{run_dir} is quantized ({quantization.name}): sparse_kernels take the 2:4 weights "
            "in the model's dtype; load the pruned run it came from"
        )
    if sparse_kernels:
        dtype = getattr(torch, str(model_config.get("dtype", "float32")))
        check_sparse_kernels(str(manifest.get("granularity")), device or "cpu", dtype)
    if pipeline is not None:
        name = str(model_config.get("name", "in_memory"))
        adapter = adapter_for(pipeline, model_config.get("sampling"), name)
    elif "_target_" not in model_config:
        raise ValueError(
            f"{run_dir} pruned a pipeline in memory (obsdiff.api.prune): its manifest names no "
            "model to load; pass the base pipeline: load_pruned(run_dir, pipeline=<it>)"
        )
    else:
        adapter = adapter_from_config(base_config(model_config, pretrained))
    pipe = adapter.load()
    denoiser = adapter.denoiser(pipe)
    if "structure" in manifest:  # blocks removed, linears resized or factorised, heads: first
        adapter.restore_structure(denoiser, manifest["structure"])
    state = safetensors.torch.load_file(str(Path(run_dir) / WEIGHTS))
    denoiser.load_state_dict(state, strict=True)
    if device is not None:
        pipe.to(device)
    if sparse_kernels:
        names = [
            r["name"] for r in manifest.get("records", []) if r.get("type", "layer") == "layer"
        ]
        use_sparse_kernels(denoiser, names)
    result = None
    if quantization is not None:  # as the run did, on the device it runs on
        result = quantize_denoiser(adapter, denoiser, quantization)
    return PrunedModel(pipe, adapter, manifest, quantization=result)
