"""The recover app's task (`python -m obsdiff.recover`, conf/recover.yaml): a pruned run
distilled towards its dense model, written as a run directory of its own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from obsdiff.app.config import ConfigError, settings
from obsdiff.app.settings import (
    check_lora_width,
    check_recoverable,
    check_recovery_resume,
    identity,
    pruned_identity,
)
from obsdiff.app.shell import RunContext, execute, show_only
from obsdiff.artifacts.pruned import (
    base_config,
    check_pruned_run,
    check_same_base,
    load_pruned,
    save_pruned,
)
from obsdiff.artifacts.record import RunIdentity, RunRecord
from obsdiff.calibration.sequential import CalibrationSettings
from obsdiff.models.base import adapter_from_config
from obsdiff.oneshot.settings import calibration_prompts
from obsdiff.recovery.plan import recovery_plan
from obsdiff.recovery.run import recover_pruned
from obsdiff.recovery.settings import RecoverySettings
from obsdiff.utils.devices import resolve_device


NO_RECOVERY = (
    "recover=none: this app recovers a pruned model; choose a recovery, e.g. recover=distill "
    "(conf/recover/)"
)
IN_MEMORY = (
    "its manifest names no model to load; recover it from Python: obsdiff.recover(obsdiff."
    "load_pruned(run_dir, pipeline=<base>), prompts, teacher=<a fresh base>)"
)


@dataclass
class RecoverJob:
    pruned_dir: Path
    pretrained: str | None
    prompts: list[str]
    batch_size: int
    settings: RecoverySettings
    previous: RunRecord | None  # the pruned run's record, when it is a completed run


def recover(job: RecoverJob, context: RunContext) -> RunRecord:
    # on the CPU: only its denoiser (the student) goes to the device
    pruned = load_pruned(job.pruned_dir, job.pretrained, device=torch.device("cpu"))
    teacher = pruned.adapter.load()
    loggers = None if context.logger is None else [context.logger.lightning()]
    recovered = recover_pruned(
        pruned, teacher, job.prompts, job.settings, context.device, job.batch_size, context.out,
        loggers, context.parallel,
    )  # fmt: skip
    if context.parallel.is_main:
        save_pruned(recovered, context.out)
    prune = None if job.previous is None else job.previous.prune
    return RunRecord("completed", prune=prune, recover=recovered.recovery)


def plan(cfg: DictConfig, pruned_dir: Path) -> str:
    """The recovery's memory plan for the pruned run's model (counted at the dense size)."""
    recovery, calibration, manifest = checked_settings(cfg, pruned_dir)
    base = adapter_from_config(manifest["model_config"])
    return recovery_plan(base, recovery, calibration.batch_size).table()


def checked_settings(
    cfg: DictConfig, pruned_dir: Path
) -> tuple[RecoverySettings, CalibrationSettings, dict[str, Any]]:
    """The recovery's and the calibration's settings, and the pruned run's manifest (its
    weights checked, a model it names to load): ConfigError otherwise."""
    if cfg.recover is None:
        raise ConfigError(NO_RECOVERY)
    recovery = settings(cfg.recover, RecoverySettings, "recover.")
    calibration = settings(cfg.calibration, CalibrationSettings, "calibration.")
    manifest = check_pruned_run(pruned_dir)  # its weights are there, intact
    if "quantize" in manifest:
        raise ConfigError(
            f"pruned={pruned_dir} is quantized ({manifest['quantize']['name']}): recover the "
            f"run it came from ({manifest.get('quantized_from')}), then quantize the recovered "
            "run"
        )
    if "_target_" not in manifest["model_config"]:
        raise ConfigError(f"pruned={pruned_dir} pruned a pipeline in memory: {IN_MEMORY}")
    return recovery, calibration, manifest


def task(cfg: DictConfig) -> None:
    """One recovery of a pruned run."""
    pruned_dir = Path(str(cfg.pruned)).expanduser()
    if cfg.plan_only is True:
        show_only(cfg, lambda: plan(cfg, pruned_dir))
        return
    pretrained = None if cfg.pretrained is None else str(cfg.pretrained)
    manifest = None
    names = RunIdentity()

    def validate() -> tuple[RecoverJob, torch.device]:
        nonlocal manifest
        device = resolve_device(str(cfg.device))
        recovery, calibration, manifest = checked_settings(cfg, pruned_dir)
        model_config = dict(manifest["model_config"])
        teacher = adapter_from_config(base_config(model_config, pretrained))
        teacher.check_source()  # the teacher can be loaded
        check_recoverable(teacher)
        if pretrained is not None:  # and is the base model (its architecture, from its configs)
            try:
                check_same_base(adapter_from_config(model_config), teacher, "pretrained")
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if recovery.lora_rank:  # every adapted linear wide enough, from the architecture
            check_lora_width(adapter_from_config(model_config), manifest, recovery.lora_rank)
        pruned, previous = pruned_identity(pruned_dir, manifest)
        vars(names).update(vars(pruned))  # in place: the shell records under it
        names.recover = identity(cfg).recover
        prompts = calibration_prompts(calibration).prompts
        check_recovery_resume(manifest.get("run_key"), prompts, recovery)
        job = RecoverJob(
            pruned_dir, pretrained, prompts, calibration.batch_size, recovery, previous
        )
        return job, device

    execute(cfg, validate, recover, names)
