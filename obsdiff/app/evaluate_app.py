"""The evaluate app's task (`python -m obsdiff.evaluate`, conf/evaluate.yaml): a dense model
config or a pruned (recovered, quantized) run directory, evaluated, its `gate` checked."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from obsdiff.app.config import ConfigError, to_plain
from obsdiff.app.settings import (
    build_eval,
    checked_gate,
    exit_on_failed_gate,
    gate_limits,
    identity,
    pruned_identity,
)
from obsdiff.app.shell import RunContext, execute, timed_together
from obsdiff.artifacts.pruned import check_pruned_run, load_pruned, quantize_settings
from obsdiff.artifacts.record import RunIdentity, RunRecord
from obsdiff.eval.gate import Limit
from obsdiff.eval.harness import EvalSettings, check_evaluable, evaluate_dense, evaluate_pipeline
from obsdiff.models.base import ModelAdapter, adapter_from_config
from obsdiff.models.sparse import check_sparse_kernels
from obsdiff.utils.devices import resolve_device


def pruned_run(pruned_dir: Path, manifest: dict[str, Any], names: RunIdentity) -> RunRecord:
    """What the evaluated prune run was: its identity (`pruned_identity`) under this
    evaluation's set, and its prune figures when it is a completed run of the apps."""
    identity, previous = pruned_identity(pruned_dir, manifest)
    identity = replace(identity, eval_set=names.eval_set)
    if previous is None:
        return RunRecord("completed", identity)
    return RunRecord("completed", identity, prune=previous.prune, recover=previous.recover)


@dataclass
class EvaluateJob:
    model: ModelAdapter
    model_config: dict[str, Any]
    settings: EvalSettings
    pruned: RunRecord | None  # the prune run evaluated (None: the dense model of `model`)
    pretrained: str | None
    sparse_kernels: bool = False  # 2:4 linears as semi-structured sparse weights (CUDA)
    limits: list[Limit] = field(default_factory=list)  # the gate


def evaluate(job: EvaluateJob, dense_cache: Path, context: RunContext) -> RunRecord:
    dense = None
    if job.settings.evaluate_dense or job.pruned is None:
        dense = evaluate_dense(
            job.model, job.model_config, job.settings, dense_cache, context.device,
            context.parallel,
        )  # fmt: skip
    if job.pruned is None:
        record = RunRecord("completed", eval=dense)
        return replace(record, gate=checked_gate(job.limits, record, job.settings))
    assert job.pruned.identity.pruned_run is not None
    pruned = load_pruned(
        job.pruned.identity.pruned_run,
        job.pretrained,
        sparse_kernels=job.sparse_kernels,
        device=context.device,
    )
    pipe = pruned.pipeline
    evaluation = evaluate_pipeline(
        pipe, job.model, job.settings, context.out / "eval", context.parallel, dense
    )
    record = RunRecord(
        "completed", prune=job.pruned.prune, eval=evaluation, dense=dense,
        recover=job.pruned.recover, quantize=pruned.quantization,
    )  # fmt: skip
    record = timed_together(record, pipe, job.model, job.settings, context)
    return replace(record, gate=checked_gate(job.limits, record, job.settings))


def task(cfg: DictConfig) -> None:
    """One evaluation of a dense model config or a pruned run."""
    names = replace(identity(cfg), method="dense", sparsity=0.0)
    pruned_dir = None if cfg.pruned is None else Path(str(cfg.pruned)).expanduser()
    pretrained = None if cfg.pretrained is None else str(cfg.pretrained)
    dense_cache = Path(cfg.paths.dense_cache)

    def validate() -> tuple[EvaluateJob, torch.device]:
        device = resolve_device(str(cfg.device))
        pruned = None
        if pruned_dir is None:
            model_config = to_plain(cfg.model)
        else:
            manifest = check_pruned_run(pruned_dir)  # its weights are there, intact
            pruned = pruned_run(pruned_dir, manifest, names)
            vars(names).update(vars(pruned.identity))  # in place: the shell records under it
            model_config = dict(manifest["model_config"])
            if "_target_" not in model_config:
                raise ConfigError(
                    f"pruned={pruned_dir} pruned a pipeline in memory (obsdiff.prune): its "
                    "manifest names no model to load; evaluate it from Python: "
                    "obsdiff.evaluate(obsdiff.load_pruned(run_dir, pipeline=<base>), ...)"
                )
            if pretrained is not None:
                model_config["pretrained"] = pretrained
        sparse_kernels = bool(cfg.get("sparse_kernels", False))
        if sparse_kernels:
            if pruned_dir is None:
                raise ConfigError("sparse_kernels=true needs pruned=<the run of a 2:4 prune>")
            quantized = quantize_settings(manifest)
            if quantized is not None:
                raise ConfigError(
                    f"sparse_kernels=true takes 2:4 weights in the model's dtype; pruned="
                    f"{pruned_dir} is quantized ({quantized.name}): give the run it came from"
                )
            dtype = getattr(torch, str(model_config.get("dtype", "float32")))
            check_sparse_kernels(str(manifest.get("granularity")), device, dtype)
        model = adapter_from_config(model_config)
        model.check_source()  # the model's files are reachable (a clear error if not)
        limits = gate_limits(cfg, against_dense=pruned is not None)
        settings = build_eval(cfg.eval, str(device), dense_cache)
        check_evaluable(model, settings)
        job = EvaluateJob(model, model_config, settings, pruned, pretrained, sparse_kernels, limits)
        return job, device

    record = execute(cfg, validate, lambda job, context: evaluate(job, dense_cache, context), names)
    exit_on_failed_gate(record)
