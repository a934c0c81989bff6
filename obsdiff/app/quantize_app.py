"""The quantize app's task (`python -m obsdiff.quantize`, conf/quantize.yaml): a pruned (or
recovered, or dense) run's denoiser quantized by torchao, written as a run directory of its own,
then evaluated against the dense model on the same prompts and seeds, with an optional gate."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from obsdiff.app.config import ConfigError, settings
from obsdiff.app.settings import (
    build_eval,
    checked_gate,
    exit_on_failed_gate,
    gate_limits,
    identity,
    pruned_identity,
)
from obsdiff.app.shell import RunContext, execute, timed_together
from obsdiff.artifacts.pruned import (
    base_config,
    check_quantizable,
    load_pruned,
    quantize_pruned,
    save_pruned,
)
from obsdiff.artifacts.record import RunIdentity, RunRecord
from obsdiff.eval.gate import Limit
from obsdiff.eval.harness import EvalSettings, check_evaluable, evaluate_dense, evaluate_pipeline
from obsdiff.models.base import ModelAdapter, adapter_from_config
from obsdiff.quantization import QuantizeSettings
from obsdiff.utils.devices import resolve_device


NO_SCHEME = "quantize=none: this app quantizes; choose a scheme, e.g. quantize=int8_weight_only"


@dataclass
class QuantizeJob:
    pruned_dir: Path
    pretrained: str | None
    quantization: QuantizeSettings
    model: ModelAdapter  # the base model (the dense reference)
    model_config: dict[str, object]
    settings: EvalSettings
    limits: list[Limit]
    previous: RunRecord | None  # the quantized run's record, when it is a completed run


def quantize_and_evaluate(job: QuantizeJob, dense_cache: Path, context: RunContext) -> RunRecord:
    """Load, save in the model's dtype, quantize (recorded in the manifest), evaluate."""
    dense = None
    if job.settings.evaluate_dense:
        dense = evaluate_dense(
            job.model, job.model_config, job.settings, dense_cache, context.device,
            context.parallel,
        )  # fmt: skip
    pruned = load_pruned(job.pruned_dir, job.pretrained, device=context.device)
    pruned.manifest["quantized_from"] = str(job.pruned_dir.resolve())
    written = context.out if context.parallel.is_main else None
    if written is not None:
        save_pruned(pruned, written)
    result = quantize_pruned(pruned, job.quantization, written)
    evaluation = evaluate_pipeline(
        pruned.pipeline, job.model, job.settings, context.out / "eval", context.parallel, dense
    )
    previous = job.previous
    record = RunRecord(
        "completed",
        prune=None if previous is None else previous.prune,
        recover=None if previous is None else previous.recover,
        quantize=result,
        eval=evaluation,
        dense=dense,
    )
    record = timed_together(record, pruned.pipeline, job.model, job.settings, context)
    return replace(record, gate=checked_gate(job.limits, record, job.settings))


def task(cfg: DictConfig) -> None:
    """One quantization of a pruned run, evaluated."""
    pruned_dir = Path(str(cfg.pruned)).expanduser()
    pretrained = None if cfg.pretrained is None else str(cfg.pretrained)
    dense_cache = Path(cfg.paths.dense_cache)
    names = RunIdentity()

    def validate() -> tuple[QuantizeJob, torch.device]:
        device = resolve_device(str(cfg.device))
        if cfg.quantize is None:
            raise ConfigError(NO_SCHEME)
        quantization = settings(cfg.quantize, QuantizeSettings, "quantize.")
        try:
            manifest = check_quantizable(pruned_dir, quantization, device, pretrained)
        except ValueError as err:  # PrunedRunError, QuantizeError: the run or the scheme
            raise ConfigError(str(err)) from None
        pruned, previous = pruned_identity(pruned_dir, manifest)
        vars(names).update(vars(pruned))  # in place: the shell records under it
        mine = identity(cfg)
        names.eval_set, names.quantize = mine.eval_set, mine.quantize
        model_config = base_config(dict(manifest["model_config"]), pretrained)
        model = adapter_from_config(model_config)
        model.check_source()  # the base model's files are reachable (a clear error if not)
        limits = gate_limits(cfg, against_dense=True)
        evaluation = build_eval(cfg.eval, str(device), dense_cache)
        check_evaluable(model, evaluation)
        job = QuantizeJob(
            pruned_dir, pretrained, quantization, model, model_config, evaluation, limits,
            previous,
        )  # fmt: skip
        return job, device

    record = execute(
        cfg, validate, lambda job, ctx: quantize_and_evaluate(job, dense_cache, ctx), names
    )
    exit_on_failed_gate(record)
