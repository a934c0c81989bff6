"""The app layer's settings: config nodes turned into typed, checked objects, once, before any
work (the prune job with its model layout, the evaluation, the runner). The settings, their
types and defaults live in the dataclasses of the layers below (`obsdiff.app.config`); this
module only composes them.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from obsdiff.api import evaluation_settings
from obsdiff.app.config import ConfigError, build, instantiate_model, settings, to_plain
from obsdiff.artifacts.record import RecordError, RunIdentity, RunRecord
from obsdiff.calibration.sequential import CalibrationSettings
from obsdiff.eval.gate import (
    GateCheck,
    GateError,
    Limit,
    check_gate_metrics,
    gate_checks,
    gate_summary,
    parse_gate,
)
from obsdiff.eval.harness import EvalSettings
from obsdiff.eval.options import EvalOptions, EvalPromptOptions
from obsdiff.methods.base import PruningMethod
from obsdiff.methods.granularity import Granularity
from obsdiff.methods.modulation import LowRankModulation
from obsdiff.models.base import ModelAdapter
from obsdiff.models.experts import check_one_denoiser
from obsdiff.oneshot.job import PruneJob
from obsdiff.oneshot.settings import PruneSettings, calibration_prompts
from obsdiff.prompts.eval_sets import EvalPrompts, coco_captions, prompt_file
from obsdiff.prompts.files import BUNDLED_PROMPTS
from obsdiff.prompts.image_folder import read_image_folder
from obsdiff.pruning.schedules import TimestepWeighting
from obsdiff.recovery.checkpoint import RecoveryCheckpoint, RecoveryCheckpointError, recovery_key
from obsdiff.recovery.lora import check_lora_rank, lora_targets
from obsdiff.recovery.settings import RecoverySettings
from obsdiff.runners.fabric import RunnerSettings


BUNDLED_EVAL_PROMPTS = BUNDLED_PROMPTS.with_name("eval_prompts.txt")


log = logging.getLogger(__name__)

EXIT_GATE = 3  # a gate's limit failed: the run is complete and recorded, its quality is not


def is_multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


STRATEGIES = ("auto", "ddp", "fsdp")


def runner_settings(node: DictConfig, trains: bool = False) -> RunnerSettings:
    """The `runner` group, checked against the machine (CUDA runners need visible GPUs) and
    the job: FSDP shards a recovery's training (`trains`) over several devices."""
    runner = settings(node, RunnerSettings, "runner.")
    if runner.strategy not in STRATEGIES:
        raise ConfigError(
            f"runner.strategy={runner.strategy!r}; use one of {', '.join(STRATEGIES)}"
        )
    if runner.strategy == "fsdp":
        if not trains:
            raise ConfigError(
                "runner.strategy=fsdp shards a recovery's training state, and this job trains "
                "nothing; use runner=ddp for data-parallel calibration (or recover=distill in "
                "the run app)"
            )
        every_gpu = runner.devices in (-1, "-1") and torch.cuda.device_count() == 1
        if runner.devices in (1, "1") or every_gpu:
            raise ConfigError(
                f"runner.strategy=fsdp on one device (runner.devices={runner.devices}"
                f"{': one GPU visible' if every_gpu else ''}): FSDP shards the recovery over "
                "several; use runner.devices=N (N >= 2), or on one device runner=single "
                "(recover.gradient_checkpointing=true and recover.lora_rank save memory there)"
            )
    multi = runner.devices not in (1, "1") or runner.strategy != "auto"
    if multi and is_multirun():
        raise ConfigError(
            f"runner.devices={runner.devices} inside a multirun: Lightning relaunches the whole "
            "command per rank, sweep included; run each job of the sweep as its own command "
            "(e.g. one `python -m obsdiff.run runner=ddp ...` per setting), or sweep with "
            "runner=single and a launcher that gives each job its GPU (--launcher slurm)"
        )
    if multi and runner.accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ConfigError(
            f"runner.accelerator={runner.accelerator} (runner.devices={runner.devices}) asks "
            "for CUDA devices, but none is visible; use runner=single, or runner=ddp_cpu to "
            "run the multi-process path on CPU processes"
        )
    return runner


def identity(cfg: DictConfig) -> RunIdentity:
    """What names a run in a sweep (also for a run that failed before anything was built)."""
    choices = HydraConfig.get().runtime.choices
    names = RunIdentity(model=choices.get("model"))
    if "method" in cfg:
        names.method = choices.get("method")
        names.granularity = choices.get("granularity")
        names.sparsity = cfg.get("sparsity")
        names.weighting = choices.get("weighting")
        if cfg.get("modulation") is not None:
            names.modulation = choices.get("modulation")
        names.packages = cfg.get("packages")
    if "eval" in cfg:
        names.eval_set = choices.get("eval")
    if cfg.get("recover") is not None:
        names.recover = choices.get("recover")
    if cfg.get("quantize") is not None:
        names.quantize = choices.get("quantize")
    return names


def task_overrides() -> dict[str, str]:
    """The job's command-line settings (`key=value`, Hydra's own left out): a sweep's axes."""
    pairs = (str(item).lstrip("+~").split("=", 1) for item in HydraConfig.get().overrides.task)
    return {p[0]: p[1] for p in pairs if len(p) == 2 and not p[0].startswith("hydra.")}


def build_prune_job(cfg: DictConfig, reach_model: bool = True) -> PruneJob:
    """The composed prune (or run) config as a validated job, with the model's layout checked
    from its architecture alone: nothing is loaded here. `reach_model=False` (the memory plan)
    does not ask whether the checkpoint's weights can be reached."""
    plain = settings(cfg, PruneSettings, only=PruneSettings.values())
    calibration = settings(cfg.calibration, CalibrationSettings, "calibration.")
    runner = settings(cfg.runner, RunnerSettings, "runner.") if "runner" in cfg else None
    return plain.job(
        model=instantiate_model(cfg.model),
        model_config=to_plain(cfg.model),
        method=build(cfg.method, PruningMethod, "method"),
        granularity=build(cfg.granularity, Granularity, "granularity"),
        weighting=build(cfg.weighting, TimestepWeighting, "weighting"),
        prompts=calibration_prompts(calibration),
        calibration=calibration,
        shard_solve=(runner or RunnerSettings()).shard_solve,
        reach_model=reach_model,
        modulation=modulation_settings(cfg),
    )


def modulation_settings(cfg: DictConfig) -> LowRankModulation | None:
    """The `modulation` group: None for `modulation=none`."""
    if cfg.get("modulation") is None:
        return None
    return build(cfg.modulation, LowRankModulation, "modulation")


def eval_prompts(options: EvalPromptOptions) -> EvalPrompts:
    """The evaluation prompts `eval.prompts` names."""
    if options.source == "coco":
        if options.path is None:
            raise ConfigError("eval.prompts.source=coco needs eval.prompts.path (captions JSON)")
        return coco_captions(options.path, options.num_prompts, seed=options.subset_seed)
    if options.source in ("file", "bundled"):
        path = BUNDLED_EVAL_PROMPTS if options.source == "bundled" else options.path
        if path is None:
            raise ConfigError("eval.prompts.source=file needs eval.prompts.path")
        return prompt_file(path, options.num_prompts, fmt=options.format, column=options.column)
    raise ConfigError(f"eval.prompts.source={options.source!r}; use bundled, coco or file")


def build_eval(
    node: DictConfig, device: str = "cpu", cache_dir: Path = Path("outputs/dense")
) -> EvalSettings:
    """The `eval` group as settings; every file and backend is checked here, before any work
    (`cache_dir`: where the toy FID reference is rendered, paths.dense_cache)."""
    options = settings(node, EvalOptions, "eval.")
    prompts = eval_prompts(options.prompts)
    try:
        return evaluation_settings(prompts, options, device, cache_dir)
    except ValueError as err:  # every setting's problem names its eval.<key>
        raise ConfigError(str(err)) from err


def plan_only(cfg: DictConfig) -> bool:
    """The prune (or run) config's `plan_only`, typed: print the memory plan and stop. A value
    that is not a boolean reads False here: the job's validation refuses it under the shell's
    failure policy (exit 2 alone; a failed job inside a multirun)."""
    try:
        return settings(cfg, PruneSettings, only=("plan_only",)).plan_only
    except ConfigError:
        return False


def check_recovery_resume(
    run_key: str | None, prompts: list[str], recovery: RecoverySettings
) -> None:
    """The recovery's image folder, when it has one, is readable (`read_image_folder`); the
    job's run directory holds no recovery checkpoint, or one that this recovery can resume
    from (readable, of the same prune, prompts and settings): checked before anything loads."""
    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        if recovery.images is not None:
            read_image_folder(recovery.images)
        RecoveryCheckpoint(out, recovery_key(run_key, prompts, recovery)).check()
    except (RecoveryCheckpointError, ValueError) as err:
        raise ConfigError(str(err)) from None


def check_recoverable(base: ModelAdapter) -> None:
    """The model has one denoiser to recover (`check_one_denoiser`), from its architecture:
    ConfigError before anything loads."""
    try:
        check_one_denoiser(base.denoiser_skeleton(), base.name)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_lora_width(base: ModelAdapter, manifest: dict[str, Any], rank: int) -> None:
    """`recover.lora_rank` fits every linear LoRA adapts, at the pruned run's widths (its
    recorded structure over the base architecture): ConfigError naming the narrowest."""
    skeleton = base.denoiser_skeleton()
    if "structure" in manifest:
        base.restore_structure(skeleton, manifest["structure"])
    try:
        check_lora_rank(skeleton, lora_targets(base, skeleton), rank)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def pruned_identity(
    pruned_dir: Path, manifest: dict[str, Any]
) -> tuple[RunIdentity, RunRecord | None]:
    """Who a run of a pruned model (evaluated, recovered) is: the pruned run's identity (its
    record's when it is a completed run of the apps, else what its manifest says), naming the
    pruned run, and that record."""
    try:
        previous: RunRecord | None = RunRecord.read(pruned_dir)
    except RecordError:
        previous = None
    if previous is not None and previous.completed:
        return replace(previous.identity, pruned_run=str(pruned_dir)), previous
    names = RunIdentity(
        model=manifest["model"]["name"],
        method=manifest["method"]["name"],
        granularity=manifest["granularity"],
        sparsity=manifest["sparsity"],
        weighting=manifest["weighting"].get("scheme"),
        packages=manifest["packages"],
        pruned_run=str(pruned_dir),
        modulation=manifest.get("modulation", {}).get("name"),
        quantize=manifest.get("quantize", {}).get("name"),
    )
    return names, None


def gate_limits(cfg: DictConfig, against_dense: bool) -> list[Limit]:
    """The app's `gate`, checked before any work: each limit well formed and on a metric the
    evaluation computes (`against_dense`: of a model compared with its dense model);
    ConfigError naming the limit otherwise."""
    if not cfg.get("gate"):
        return []
    try:
        limits = parse_gate(cfg.gate)
        options = settings(cfg.eval, EvalOptions, "eval.")
        check_gate_metrics(limits, options.metric_names(against_dense))
    except GateError as err:
        raise ConfigError(str(err)) from None
    return limits


def checked_gate(
    limits: list[Limit], record: RunRecord, settings: EvalSettings
) -> list[GateCheck] | None:
    """The gate's limits checked against the record's evaluation (None: no gate), logged."""
    if not limits or record.eval is None:
        return None
    evaluation = record.eval
    confidence = settings.bootstrap.confidence
    checks = gate_checks(limits, evaluation.metrics, evaluation.intervals, confidence)
    failed = [check for check in checks if not check.passed]
    (log.error if failed else log.info)("gate:\n%s", gate_summary(checks))
    return checks


def exit_on_failed_gate(record: RunRecord | None) -> None:
    """Exit with `EXIT_GATE` when a limit of the record's gate failed (a single run; a
    multirun's job records it and the sweep goes on)."""
    if record is None or not record.gate or all(check.passed for check in record.gate):
        return
    failed = ", ".join(check.limit for check in record.gate if not check.passed)
    log.error("the gate failed (%s): the run is recorded; exit %d", failed, EXIT_GATE)
    if not is_multirun():
        sys.exit(EXIT_GATE)
