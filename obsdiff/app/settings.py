"""The app layer's settings: config nodes turned into typed, checked objects, once, before any
work (the prune job with its model layout, the evaluation, the runner).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, TypeVar

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

from obsdiff.api import METRICS, evaluation_settings
from obsdiff.app.config import ConfigError, instantiate, instantiate_model, to_plain
from obsdiff.artifacts.record import RunIdentity
from obsdiff.calibration.sequential import CalibrationSettings, Placement
from obsdiff.eval.harness import EvalSettings
from obsdiff.methods.base import PruningMethod
from obsdiff.methods.granularity import Granularity
from obsdiff.oneshot.job import PruneJob, check_layout
from obsdiff.oneshot.plan import GB, choose_packages, memory_plan
from obsdiff.prompts.eval_sets import EvalPrompts, coco_captions, prompt_file
from obsdiff.prompts.files import BUNDLED_PROMPTS, load_prompts
from obsdiff.pruning.schedules import TimestepWeighting
from obsdiff.runners.fabric import RunnerSettings
from obsdiff.utils.devices import resolve_device


log = logging.getLogger(__name__)

BUNDLED_EVAL_PROMPTS = BUNDLED_PROMPTS.with_name("eval_prompts.txt")
AUTO = "auto"  # packages=auto: the fewest that fit memory_budget
T = TypeVar("T")


def number(
    node: DictConfig,
    key: str,
    kind: type[T],
    example: str,
    minimum: float | None = None,
    prefix: str = "",
) -> T:
    """`node[key]` as an int or float (at least `minimum`), or one ConfigError naming the key
    (`prefix` + key: where the node sits in the config) and an example."""
    value = OmegaConf.select(node, key)
    name = prefix + key
    problem = f"{name}={value!r} is not {'an integer' if kind is int else 'a number'}"
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{problem}; set e.g. {name}={example}")
    try:
        converted = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{problem}; set e.g. {name}={example}") from None
    if not math.isfinite(converted) or (kind is int and converted != int(converted)):
        raise ConfigError(f"{problem}; set e.g. {name}={example}")
    if minimum is not None and converted < minimum:
        raise ConfigError(f"{name}={value!r} must be >= {minimum:g}; set e.g. {name}={example}")
    return kind(converted)  # type: ignore[call-arg]


def block_range(value: Any) -> tuple[int, int] | None:
    """`blocks`: null or [start, end) as two integers."""
    if value is None:
        return None
    hint = "blocks must be null (the granularity's default) or [start, end), e.g. blocks=[1,23]"
    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value)
    if not isinstance(value, list) or len(value) != 2:
        raise ConfigError(f"blocks={value!r}: {hint}")
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in value):
        raise ConfigError(f"blocks={value!r}: {hint}")
    return value[0], value[1]


def is_multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def runner_settings(node: DictConfig) -> RunnerSettings:
    """The `runner` group, checked against the machine: CUDA runners need visible GPUs."""
    settings = RunnerSettings(**OmegaConf.to_container(node))  # type: ignore[arg-type]
    multi = settings.devices not in (1, "1") or settings.strategy != "auto"
    if multi and is_multirun():
        raise ConfigError(
            f"runner.devices={settings.devices} inside a multirun: Lightning relaunches the whole "
            "command per rank, sweep included; run each job of the sweep as its own command "
            "(e.g. one `python -m obsdiff.run runner=ddp ...` per setting), or sweep with "
            "runner=single and a launcher that gives each job its GPU (--launcher slurm)"
        )
    if multi and settings.accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ConfigError(
            f"runner.accelerator={settings.accelerator} (runner.devices={settings.devices}) asks "
            "for CUDA devices, but none is visible; use runner=single, or runner=ddp_cpu to "
            "run the multi-process path on CPU processes"
        )
    return settings


def identity(cfg: DictConfig) -> RunIdentity:
    """What names a run in a sweep (also for a run that failed before anything was built)."""
    choices = HydraConfig.get().runtime.choices
    names = RunIdentity(model=choices.get("model"))
    if "method" in cfg:
        names.method = choices.get("method")
        names.granularity = choices.get("granularity")
        names.sparsity = cfg.get("sparsity")
        names.weighting = choices.get("weighting")
        names.packages = cfg.get("packages")
    if "eval" in cfg:
        names.eval_set = choices.get("eval")
    return names


def task_overrides() -> dict[str, str]:
    """The job's command-line settings (`key=value`, Hydra's own left out): a sweep's axes."""
    pairs = (str(item).lstrip("+~").split("=", 1) for item in HydraConfig.get().overrides.task)
    return {p[0]: p[1] for p in pairs if len(p) == 2 and not p[0].startswith("hydra.")}


def build_prune_job(cfg: DictConfig, reach_model: bool = True) -> PruneJob:
    """The composed prune (or run) config as a validated job, with the model's layout checked
    from its architecture alone: nothing is loaded here. `reach_model=False` (the memory plan)
    does not ask whether the checkpoint's weights can be reached."""
    calibration = cfg.calibration
    source = BUNDLED_PROMPTS if calibration.prompts == "bundled" else calibration.prompts
    seed = number(cfg, "seed", int, "0")
    prompts = load_prompts(
        source,
        num_prompts=None  # all of the file's prompts
        if calibration.num_prompts is None
        else number(cfg, "calibration.num_prompts", int, "100"),
        fmt=calibration.format,
        column=calibration.column,
        selection=calibration.selection,
        seed=seed,
    )
    auto = str(cfg.packages) == AUTO
    budget = None
    if cfg.get("memory_budget") is not None:
        budget = number(cfg, "memory_budget", float, "24", minimum=0.001) * GB
    elif auto:
        raise ConfigError("packages=auto needs memory_budget=<GB of the device>, e.g. 24")
    job = PruneJob(
        model=instantiate_model(cfg.model),
        model_config=to_plain(cfg.model),
        method=instantiate(cfg.method, PruningMethod, "method"),  # type: ignore[type-abstract]
        granularity=instantiate(cfg.granularity, Granularity, "granularity"),
        sparsity=number(cfg, "sparsity", float, "0.5"),
        weighting=instantiate(cfg.weighting, TimestepWeighting, "weighting"),
        packages=1 if auto else number(cfg, "packages", int, "4"),
        prompts=prompts,
        calibration=CalibrationSettings(
            batch_size=number(cfg, "calibration.batch_size", int, "4"),
            seed=seed,
            include_uncond=bool(calibration.include_uncond),
            hessian_precision=str(calibration.hessian_precision),
        ),
        device=resolve_device(str(cfg.device)),
        blocks=block_range(cfg.blocks),
        save=bool(cfg.save),
        keep_checkpoint=bool(cfg.get("keep_checkpoint", False)),
        statistics_cache=None
        if cfg.get("statistics_cache") is None
        else Path(str(cfg.statistics_cache)),
        placement=Placement(
            offload_statistics=bool(cfg.get("offload", {}).get("statistics", False)),
            offload_components=bool(cfg.get("offload", {}).get("components", False)),
            shard_solve=bool(cfg.runner.get("shard_solve", True)) if "runner" in cfg else True,
        ),
    )
    if auto:
        assert budget is not None
        job = choose_packages(job, budget)  # fits by construction
    check_layout(job, reach_model)
    if budget is not None and not auto and not (plan := memory_plan(job)).fits(budget):
        log.warning(
            "predicted peak %.2f GB exceeds memory_budget=%g GB with packages=%d; packages=auto "
            "picks the fewest that fit",
            plan.predicted_peak_bytes / GB,
            budget / GB,
            job.packages,
        )
    return job


def eval_prompts(node: DictConfig) -> EvalPrompts:
    source = str(node.source)
    count = None
    if node.num_prompts is not None:
        count = number(node, "num_prompts", int, "1000", minimum=1, prefix="eval.prompts.")
    if source == "coco":
        seed = number(node, "subset_seed", int, "0", prefix="eval.prompts.")
        return coco_captions(node.path, count, seed=seed)
    if source in ("file", "bundled"):
        path = BUNDLED_EVAL_PROMPTS if source == "bundled" else node.path
        return prompt_file(path, count, fmt=str(node.format), column=str(node.column))
    raise ValueError(f"eval.prompts.source={source!r}; use bundled, coco or file")


def build_eval(
    node: DictConfig, device: str = "cpu", cache_dir: Path = Path("outputs/dense")
) -> EvalSettings:
    """The `eval` group as settings; every file and backend is checked here, before any work
    (`cache_dir`: where the toy FID reference is rendered, paths.dense_cache)."""

    def whole(key: str, example: str, minimum: int = 1) -> int:
        return number(node, key, int, example, minimum=minimum, prefix="eval.")

    def enabled(group: str) -> bool:
        return bool(node.get(group, {}).get("enabled", False))

    prompts = eval_prompts(node.prompts)
    try:
        return evaluation_settings(
            prompts,
            metrics=[m for m in METRICS if enabled(m)],
            name=str(node.name),
            seed=whole("seed", "0", minimum=0),
            batch_size=whole("batch_size", "4"),
            fid_reference=str(node.fid.reference),
            fid_mode=str(node.fid.mode),
            fid_extractor=str(node.fid.extractor),
            fid_batch_size=whole("fid.batch_size", "32"),
            clip_model=str(node.clip_score.model),
            clip_batch_size=whole("clip_score.batch_size", "32"),
            image_reward_model=str(node.image_reward.model),
            image_reward_python=node.image_reward.python,
            image_reward_download_root=node.image_reward.download_root,
            efficiency_repeats=whole("efficiency.repeats", "3", 0),
            grid_size=whole("grid_size", "8", 0),
            evaluate_dense=bool(node.dense),
            images_per_prompt=whole("images_per_prompt", "1"),
            sampling={k: v for k, v in to_plain(node.sampling).items() if v is not None},
            dense_relative=enabled("dense_relative"),
            lpips=node.dense_relative.lpips,
            feature_distance=node.dense_relative.features,
            bootstrap_resamples=whole("bootstrap.resamples", "2000", 0),
            fid_resamples=whole("bootstrap.fid_resamples", "200", 0),
            confidence=number(node, "bootstrap.confidence", float, "0.95", prefix="eval."),
            bootstrap_seed=whole("bootstrap.seed", "0", 0),
            device=device,
            cache_dir=cache_dir,
        )
    except ValueError as err:  # every setting's problem names its eval.<key>
        raise ConfigError(str(err)) from err
