"""The run app's task (`python -m obsdiff.run`, conf/run.yaml): prune, optionally recover
(`recover=distill`) and quantize (`quantize=int8_weight_only`), then evaluate the compressed and
the dense model (and check the `gate`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from obsdiff.app.config import ConfigError
from obsdiff.app.config import settings as typed
from obsdiff.app.settings import (
    build_eval,
    build_prune_job,
    check_lora_width,
    check_recoverable,
    check_recovery_resume,
    checked_gate,
    exit_on_failed_gate,
    gate_limits,
    plan_only,
)
from obsdiff.app.shell import RunContext, execute, run_dir, show_only, timed_together
from obsdiff.artifacts.pruned import quantize_pruned, save_pruned
from obsdiff.artifacts.record import RunRecord
from obsdiff.eval.gate import Limit
from obsdiff.eval.harness import EvalSettings, check_evaluable, evaluate_dense, evaluate_pipeline
from obsdiff.oneshot.checkpoint import check_previous_run
from obsdiff.oneshot.job import PruneJob
from obsdiff.oneshot.plan import memory_plan
from obsdiff.oneshot.run import prune_pipeline
from obsdiff.quantization import (
    QuantizeError,
    QuantizeSettings,
    check_device,
    check_widths,
    linear_widths,
)
from obsdiff.recovery.plan import recovery_plan
from obsdiff.recovery.run import recover_pruned
from obsdiff.recovery.settings import RecoverySettings


@dataclass
class RunJob:
    """What the run app does: the prune, then its optional stages, the evaluation, the gate."""

    prune: PruneJob
    recovery: RecoverySettings | None
    quantization: QuantizeSettings | None
    settings: EvalSettings
    limits: list[Limit] = field(default_factory=list)


def prune_and_evaluate(run: RunJob, dense_cache: Path, context: RunContext) -> RunRecord:
    """Prune; with a recovery, distil the pruned model towards a fresh copy of the dense one on
    the calibration prompts (the run directory's weights are then the recovered ones); with a
    quantization, quantize it (the run directory keeps the weights in the model's dtype, its
    manifest the quantization); then evaluate, and check the gate."""
    job, recovery, settings = run.prune, run.recovery, run.settings
    job.device = context.device
    dense = None
    if settings.evaluate_dense:
        dense = evaluate_dense(
            job.model, job.model_config, settings, dense_cache, job.device, context.parallel
        )
    pruned = prune_pipeline(job, context.out, context.parallel)
    if recovery is not None:  # the pruned pipeline waits on the CPU: the device holds the plan
        pruned.pipeline.to("cpu")
        pruned = recover_pruned(
            pruned, job.model.load(), job.prompts.prompts, recovery, context.device,
            job.calibration.batch_size, context.out,
            None if context.logger is None else [context.logger.lightning()], context.parallel,
        )  # fmt: skip
        pruned.pipeline.to(context.device)
        if context.parallel.is_main and job.save:
            save_pruned(pruned, context.out)
    if run.quantization is not None:  # the widths a structured prune left, then quantized
        check_widths(run.quantization, linear_widths(pruned.adapter, pruned.denoiser))
        written = context.parallel.is_main and job.save
        quantize_pruned(pruned, run.quantization, context.out if written else None)
    evaluation = evaluate_pipeline(
        pruned.pipeline, job.model, settings, context.out / "eval", context.parallel, dense
    )
    record = RunRecord(
        "completed", prune=pruned.result, recover=pruned.recovery, eval=evaluation, dense=dense,
        quantize=pruned.quantization,
    )  # fmt: skip
    record = timed_together(record, pruned.pipeline, job.model, settings, context)
    return replace(record, gate=checked_gate(run.limits, record, settings))


def plans(cfg: DictConfig) -> str:
    """The prune's memory plan, and the recovery's with `recover=<option>`."""
    job = build_prune_job(cfg, reach_model=False)
    components = job.model.component_skeletons()
    text = memory_plan(job, components).table()
    if cfg.recover is not None:
        recovery = typed(cfg.recover, RecoverySettings, "recover.")
        plan = recovery_plan(job.model, recovery, job.calibration.batch_size, components)
        text += "\n" + plan.table()
    return text


def task(cfg: DictConfig) -> float | None:
    """One run: prune, then evaluate; returns the achieved sparsity (None: refused or planned)."""
    if plan_only(cfg):  # the prune's memory plan, as the prune app prints it; the recovery's
        show_only(cfg, lambda: plans(cfg))
        return None
    dense_cache = Path(cfg.paths.dense_cache)

    def validate() -> tuple[RunJob, torch.device]:
        job = build_prune_job(cfg)
        check_previous_run(run_dir(), job.run_key)  # a resume's checkpoint, readable
        recovery = None
        if cfg.recover is not None:
            recovery = typed(cfg.recover, RecoverySettings, "recover.")
            check_recovery_resume(job.run_key, job.prompts.prompts, recovery)
            check_recoverable(job.model)
            if recovery.lora_rank:  # at the dense widths (a structured prune checks again)
                check_lora_width(job.model, {}, recovery.lora_rank)
        quantization = None
        if cfg.quantize is not None:
            quantization = typed(cfg.quantize, QuantizeSettings, "quantize.")
            try:  # the device, and the group size against the dense widths (again once pruned)
                check_device(quantization, job.device)
                skeleton = job.model.denoiser_skeleton()
                check_widths(quantization, linear_widths(job.model, skeleton))
            except QuantizeError as err:
                raise ConfigError(str(err)) from None
        limits = gate_limits(cfg, against_dense=True)
        settings = build_eval(cfg.eval, str(job.device), dense_cache)
        check_evaluable(job.model, settings)
        settings.prompts.check_disjoint(job.prompts.prompts)
        return RunJob(job, recovery, quantization, settings, limits), job.device

    def work(run: RunJob, context: RunContext) -> RunRecord:
        return prune_and_evaluate(run, dense_cache, context)

    record = execute(cfg, validate, work)
    exit_on_failed_gate(record)
    return None if record is None or record.prune is None else record.prune.achieved_sparsity
