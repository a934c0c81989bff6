"""The Python API: prune, save, load and evaluate diffusers pipelines already in memory.

    import obsdiff
    pruned = obsdiff.prune(pipe, method="obsdiff", granularity="unstructured", sparsity=0.5,
                           prompts=prompts, packages=4, weighting="log_decrease")
    obsdiff.save_pruned(pruned, "my_run")
    pruned = obsdiff.load_pruned("my_run")
    scores = obsdiff.evaluate(pruned, eval_prompts, metrics=["clip_score"], out_dir="ev")

The pipeline's family is recognised from its class; methods, granularities and weighting
schemes go by the names of their config options (or are given as the objects the configs
build); every setting's default is the apps' (`PruneSettings`, `CalibrationSettings`,
`EvalOptions`). The work is done by the functions the apps run
(`obsdiff.oneshot.run.prune_pipeline`, `obsdiff.eval.harness.evaluate_pipeline`), on the same
typed objects, so the two paths give the same results.
"""

from __future__ import annotations

import functools
import logging
import re
import tempfile
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import DiffusionPipeline
from torch import nn

from obsdiff.artifacts.export import export_pruned as export
from obsdiff.artifacts.pruned import (
    PrunedModel,
    check_quantizable,
    load_pruned,
    quantize_pruned,
    save_pruned,
)
from obsdiff.calibration.sequential import CalibrationSettings, Offload
from obsdiff.eval.clip_score import CLIPScore
from obsdiff.eval.dense_relative import DenseRelative, build_lpips
from obsdiff.eval.fid import FID_MODES, ensure_inception
from obsdiff.eval.harness import (
    DENSE_REFERENCE,
    EvalSettings,
    Evaluation,
    FIDSettings,
    TextImageMetric,
    evaluate_pipeline,
)
from obsdiff.eval.image_reward import ImageReward
from obsdiff.eval.options import EvalOptions
from obsdiff.eval.tiny_backbones import RandomFeatures, tiny_clip
from obsdiff.methods import METHODS, Granularity, PruningMethod
from obsdiff.methods.modulation import LowRankModulation
from obsdiff.models import adapter_for
from obsdiff.models.base import DATA_DIR, ModelAdapter, adapter_from_config
from obsdiff.models.sampling import SAMPLING_KEYS, SamplingDefaults, pipeline_sampling
from obsdiff.oneshot.checkpoint import remove_checkpoint
from obsdiff.oneshot.job import PruneJob
from obsdiff.oneshot.plan import MemoryPlan
from obsdiff.oneshot.plan import memory_plan as plan_memory
from obsdiff.oneshot.run import prune_pipeline
from obsdiff.oneshot.settings import PruneSettings
from obsdiff.prompts.eval_sets import EvalPrompts
from obsdiff.prompts.files import PromptSet
from obsdiff.pruning.schedules import TimestepWeighting
from obsdiff.quantization import QuantizeSettings, check_device, check_widths, linear_widths
from obsdiff.recovery.checkpoint import remove_recovery_checkpoint
from obsdiff.recovery.plan import RecoveryPlan
from obsdiff.recovery.plan import recovery_plan as plan_recovery
from obsdiff.recovery.run import recover_pruned
from obsdiff.recovery.settings import RecoverySettings
from obsdiff.runners.fabric import RunnerSettings
from obsdiff.toy.classifier import AttributeClassifier, ClassifierFeatures, load_classifier
from obsdiff.toy.data import render_folder
from obsdiff.toy.prompt_fidelity import PromptFidelity
from obsdiff.utils.devices import resolve_device
from obsdiff.utils.settings import from_mapping


__all__ = [
    "recover",
    "recovery_memory_plan",
    "evaluate",
    "evaluation_options",
    "evaluation_settings",
    "export",
    "load_pruned",
    "memory_plan",
    "prune",
    "quantize",
    "save_pruned",
]

log = logging.getLogger(__name__)

FID_EXTRACTORS = ("inception", "tiny", "toy_classifier")
TINY = "tiny"
TOY_DATASET = "toy_dataset"
TOY_REFERENCE_SEED = 100_000  # the toy FID reference images: seeds unlike any generation's
TOY_REFERENCE_REPEATS = 2  # reference images per evaluation prompt (less noise on that side)
MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "conf" / "model"


PRUNE = PruneSettings()  # the defaults of every prune setting, said in PruneSettings
CALIBRATION = CalibrationSettings()
OFFLOAD = Offload()


def prune(
    pipe: DiffusionPipeline,
    method: str | PruningMethod = PRUNE.method,
    granularity: str | Granularity = PRUNE.granularity,
    sparsity: float = PRUNE.sparsity,
    *,
    prompts: Sequence[str],
    packages: int | str = PRUNE.packages,
    memory_budget: float | None = PRUNE.memory_budget,
    weighting: str | TimestepWeighting = PRUNE.weighting,
    sampling: dict[str, Any] | SamplingDefaults | None = None,
    batch_size: int = CALIBRATION.batch_size,
    seed: int = CALIBRATION.seed,
    include_uncond: bool = CALIBRATION.include_uncond,
    hessian_precision: str = CALIBRATION.hessian_precision,
    max_tokens: int | None = CALIBRATION.max_tokens,
    blocks: tuple[int, int] | None = PRUNE.blocks,
    device: str = PRUNE.device,
    run_dir: str | Path | None = None,
    keep_checkpoint: bool = PRUNE.keep_checkpoint,
    statistics_cache: str | Path | None = PRUNE.statistics_cache,
    offload_statistics: bool = OFFLOAD.statistics,
    offload_components: bool = OFFLOAD.components,
    modulation: LowRankModulation | dict[str, Any] | None = None,
    **method_options: Any,
) -> PrunedModel:
    """Prune `pipe` in place; returns it with its manifest and figures (`.result`: achieved
    sparsity, parameters, TFLOPs, seconds). The settings and their defaults are the prune
    app's (`PruneSettings`, `CalibrationSettings`, `Offload`); `method_options` set the
    method's parameters (e.g. `compensate=False`). `run_dir` keeps a resumable checkpoint while
    it works (removed at the end unless `keep_checkpoint`) and writes the pruned model there,
    as the prune app does (else `save_pruned` writes it later). `offload_statistics` keeps the
    calibration statistics in CPU memory, `offload_components` all but the denoiser while
    pruning (the same weights either way). `modulation`: the modulation linears factorised
    too (`LowRankModulation`, or its keys as a dict: `{"rank": 8}`, `{"energy": 0.999}`;
    the `modulation=low_rank` option). `prompts`: a list of strings. `sampling`: how the
    calibration trajectories are sampled (`SamplingDefaults`' keys: steps, guidance,
    resolution, ...); by default the model config (conf/model) of the checkpoint `pipe` was
    loaded from, else the pipeline's own defaults, and a dict sets only the keys it names
    (`in_memory_adapter`). Every setting is checked before the first calibration pass."""
    prompts = _prompt_list(prompts, "calibration")
    settings = PruneSettings(
        sparsity=sparsity,
        packages=packages,
        memory_budget=memory_budget,
        statistics_cache=None if statistics_cache is None else str(statistics_cache),
        offload=Offload(offload_statistics, offload_components),
        blocks=blocks,
        device=device,
        save=run_dir is not None,
        keep_checkpoint=keep_checkpoint,
    )
    calibration = replace(
        CALIBRATION,
        seed=seed,
        batch_size=batch_size,
        include_uncond=include_uncond,
        hessian_precision=hessian_precision,
        max_tokens=max_tokens,
    )
    job = _job(
        in_memory_adapter(pipe, sampling), method, granularity, weighting, settings, calibration,
        PromptSet(prompts, "python", "", "given", None), method_options,
        modulation=_modulation(modulation),
    )  # fmt: skip
    if run_dir is not None:
        pruned = prune_pipeline(job, Path(run_dir))
        if not keep_checkpoint:
            remove_checkpoint(Path(run_dir))
        return pruned
    with tempfile.TemporaryDirectory(prefix="obsdiff-") as scratch:  # its checkpoint, then gone
        return prune_pipeline(job, Path(scratch))


def memory_plan(
    model: DiffusionPipeline | ModelAdapter | str,
    method: str | PruningMethod = PRUNE.method,
    granularity: str | Granularity = PRUNE.granularity,
    sparsity: float = PRUNE.sparsity,
    *,
    packages: int | str = PRUNE.packages,
    memory_budget: float | None = PRUNE.memory_budget,
    blocks: tuple[int, int] | None = PRUNE.blocks,
    offload_statistics: bool = OFFLOAD.statistics,
    offload_components: bool = OFFLOAD.components,
    modulation: LowRankModulation | dict[str, Any] | None = None,
    **method_options: Any,
) -> MemoryPlan:
    """What pruning `model` will hold on its device (`MemoryPlan`: weights per component,
    statistics per package, the costliest solve, the predicted peak; `.table()` prints it), from
    its architecture alone: no weights are loaded; and what the denoiser is made of (`.roles`:
    parameters by role) and what the job reaches (`.reach`: the weights its sparsity zeroes or
    removes, and what `modulation`, as for `prune`, saves). `model`: a pipeline, an adapter, or
    the name of a model config (`conf/model/<name>.yaml`, e.g. "flux_dev": its config files ship
    with obsdiff). `packages="auto"` with `memory_budget` (GB) picks the fewest that fit."""
    if isinstance(model, str):
        model = model_from_config(model)
    elif not isinstance(model, ModelAdapter):
        model = in_memory_adapter(model, None)
    settings = PruneSettings(
        sparsity=sparsity,
        packages=packages,
        memory_budget=memory_budget,
        offload=Offload(offload_statistics, offload_components),
        blocks=blocks,
        device="cpu",
    )
    components = model.component_skeletons()  # built once, for every check and the plan
    job = _job(model, method, granularity, PRUNE.weighting, settings, CALIBRATION,
               PromptSet([""], "python", "", "given", None), method_options,
               reach_model=False, components=components,
               modulation=_modulation(modulation))  # fmt: skip
    return plan_memory(job, components)


def _modulation(modulation: LowRankModulation | dict[str, Any] | None) -> LowRankModulation | None:
    """The `modulation` argument as settings (a dict: their keys)."""
    if isinstance(modulation, dict):
        return from_mapping(LowRankModulation, modulation, "modulation.")
    return modulation


def recovery_memory_plan(
    model: DiffusionPipeline | ModelAdapter | str,
    *,
    batch_size: int = CALIBRATION.batch_size,
    **settings: Any,
) -> RecoveryPlan:
    """What recovering a prune of `model` will hold on its device (`RecoveryPlan`: teacher,
    student, gradients, AdamW state, activations with and without per-block checkpointing, the
    fewest 24/48/80 GB devices with FSDP; `.table()` prints it), from its architecture alone.
    `model` as for `memory_plan`; `batch_size`: prompts a sampling batch; `settings`: the
    recovery's (`RecoverySettings`: `precision`, `feature_weight`, ...)."""
    if isinstance(model, str):
        model = model_from_config(model)
    elif not isinstance(model, ModelAdapter):
        model = in_memory_adapter(model, None)
    return plan_recovery(model, from_mapping(RecoverySettings, settings), batch_size)


def model_from_config(name: str) -> ModelAdapter:
    """The adapter of `conf/model/<name>.yaml` (a source checkout's config group), without
    Hydra: its keys are plain values but for `${obsdiff_data:<file>}`, a file shipped in
    obsdiff/data (the toy's pipeline)."""
    path = MODEL_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in MODEL_CONFIGS.glob("*.yaml"))
        raise ValueError(f"model={name!r}: no {path}; use one of {available}")
    return adapter_from_config(_model_config(path))


def _model_config(path: Path) -> dict[str, Any]:
    text = re.sub(
        r"\$\{obsdiff_data:([^}]*)\}", lambda m: str(DATA_DIR / m.group(1)), path.read_text()
    )
    config: dict[str, Any] = yaml.safe_load(text)
    return config


def in_memory_adapter(
    pipe: DiffusionPipeline, sampling: dict[str, Any] | SamplingDefaults | None
) -> ModelAdapter:
    """The adapter of a pipeline in memory. `sampling` (a dict: only the keys it names) goes
    over the sampling this checkpoint is known by: the model config (conf/model) of the
    checkpoint it was loaded from, else what the pipeline itself does when called with a prompt
    alone (its default steps, guidance and resolution)."""
    adapter = adapter_for(pipe, sampling if isinstance(sampling, SamplingDefaults) else None)
    if isinstance(sampling, SamplingDefaults):
        return adapter
    unknown = sorted(set(sampling or {}) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"sampling has unknown keys {unknown}; use any of {list(SAMPLING_KEYS)}")
    source, defaults = _known_sampling(pipe, adapter)
    missing = sorted(set(SAMPLING_KEYS) - set(defaults) - set(sampling or {}))
    chosen = {**defaults, **(sampling or {})}
    log.info(
        "sampling of the calibration trajectories: %s (from %s%s)",
        chosen,
        source if sampling is None else f"sampling= over {source}",
        f"; obsdiff's defaults for {missing}" if missing else "",
    )
    return adapter_for(pipe, chosen)


def _known_sampling(pipe: DiffusionPipeline, adapter: ModelAdapter) -> tuple[str, dict[str, Any]]:
    """The sampling of the shipped model config whose checkpoint `pipe` was loaded from, else
    the pipeline's own defaults; with where it came from."""
    source = getattr(pipe, "name_or_path", None)
    if source:
        for path in sorted(MODEL_CONFIGS.glob("*.yaml")):
            config = _model_config(path)
            pretrained = config.get("pretrained")
            same_family = str(config.get("_target_", "")).endswith(f".{type(adapter).__name__}")
            if same_family and pretrained is not None and _same_source(pretrained, source):
                return f"conf/model/{path.name}", dict(config.get("sampling") or {})
    denoiser = getattr(pipe, adapter.denoiser_attr, None)
    return f"the {type(pipe).__name__}'s defaults", pipeline_sampling(pipe, denoiser)


def _same_source(pretrained: str, source: str) -> bool:
    """A hub id equal to the other, or two paths to the same folder."""
    if pretrained == source:
        return True
    first, second = Path(pretrained).expanduser(), Path(source).expanduser()
    return first.is_dir() and second.is_dir() and first.resolve() == second.resolve()


def _prompt_list(prompts: Sequence[str], what: str) -> list[str]:
    """`prompts` as a list of strings: one clear error for a single string (which would be
    read as one prompt per character), an empty list or a non-string."""
    if isinstance(prompts, str):
        raise ValueError(
            f"prompts={prompts!r} is one string, which would be read as {len(prompts)} "
            f"one-character prompts: give a list, e.g. prompts=[{prompts!r}]"
        )
    listed = list(prompts)
    if not listed:
        raise ValueError(f"prompts is empty: give the {what} prompts (a list of strings)")
    odd = next((p for p in listed if not isinstance(p, str)), None)
    if odd is not None:
        raise ValueError(f"prompts holds {odd!r}, not a string: give a list of strings")
    return listed


def _parameters(cls: type[PruningMethod]) -> set[str]:
    """The parameters of a method class (its dataclass fields)."""
    return {f.name for f in fields(cls)}  # type: ignore[arg-type]


def _job(
    adapter: ModelAdapter,
    method: str | PruningMethod,
    granularity: str | Granularity,
    weighting: str | TimestepWeighting,
    settings: PruneSettings,
    calibration: CalibrationSettings,
    prompts: PromptSet,
    method_options: dict[str, Any],
    reach_model: bool = True,
    components: dict[str, nn.Module] | None = None,
    modulation: LowRankModulation | None = None,
) -> PruneJob:
    """A prune job from the API's names or objects (the options' defaults)."""
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"method={method!r}; use one of {', '.join(METHODS)}")
        unknown = sorted(set(method_options) - _parameters(METHODS[method]))
        if unknown:  # e.g. token_weighting, an ObsDiff option, given to Wanda
            owners = [name for name, cls in METHODS.items() if unknown[0] in _parameters(cls)]
            hint = f"; it is an option of method={' or '.join(owners)}" if owners else ""
            raise ValueError(f"method {method!r} has no option {unknown[0]!r}{hint}")
        method = METHODS[method](**method_options)
    if isinstance(granularity, str):
        granularity = Granularity.from_name(granularity)
    if isinstance(weighting, str):
        weighting = TimestepWeighting(weighting)
    return settings.job(
        adapter, adapter.describe(), method, granularity, weighting, prompts, calibration,
        shard_solve=RunnerSettings().shard_solve, reach_model=reach_model, components=components,
        modulation=modulation,
    )  # fmt: skip


def recover(
    pruned: PrunedModel,
    prompts: Sequence[str],
    *,
    teacher: DiffusionPipeline | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    run_dir: str | Path | None = None,
    loggers: Sequence[Any] = (),
    **settings: Any,
) -> PrunedModel:
    """`pruned` distilled back towards its dense model (data-free): the dense pipeline samples
    `prompts` (`batch_size` a call), and the pruned denoiser learns to predict what the dense
    one predicts on those calls, its outputs and every block's (`RecoverySettings`, whose keys
    `settings` takes: `steps`, `lr`, `precision`, `feature_weight`, ...). The zeros of an
    unstructured or N:M prune stay exact zeros; a structured one trains every remaining weight.
    `teacher`: the dense pipeline, by default loaded again from the model `pruned` names (give
    it for a model pruned in memory, whose base pipeline the prune changed; its text encoders
    and VAE are left on the CPU once its trajectories are recorded). `run_dir`: a
    resume checkpoint there while it works (the same call continues an interrupted recovery
    to the same weights), the recovered model saved there at the end. `loggers`: Lightning
    loggers (e.g. `lightning.pytorch.loggers.WandbLogger`) for every step's `recover/loss` and
    `recover/lr`. Returns the recovered model (`pruned` is left as it was); `.recovery` says
    what it did."""
    chosen = from_mapping(RecoverySettings, settings)
    listed = _prompt_list(prompts, "recovery")
    if teacher is None:
        if pruned.adapter.pipeline is not None:
            raise ValueError(
                "this model was pruned in memory, which changed its base pipeline: pass the "
                "dense pipeline as teacher=<a fresh copy of the base model>"
            )
        teacher = pruned.adapter.load()
    dense = pruned.adapter.denoiser(teacher)
    with torch.device("meta"):  # the teacher's architecture, cut as the prune cut it
        expected = type(dense).from_config(dense.config)  # type: ignore[attr-defined]
    if "structure" in pruned.manifest:
        pruned.adapter.restore_structure(expected, pruned.manifest["structure"])
    if set(expected.state_dict()) != set(pruned.denoiser.state_dict()):
        raise ValueError(
            f"teacher={type(teacher).__name__} is not the pruned model's base: its denoiser's "
            "weights have other names; pass the dense pipeline of the model that was pruned"
        )
    out = None if run_dir is None else Path(run_dir)
    recovered = recover_pruned(
        pruned, teacher, listed, chosen, resolve_device(device), batch_size, out, list(loggers)
    )
    if out is not None:
        save_pruned(recovered, out)
        remove_recovery_checkpoint(out)
    return recovered


def quantize(
    pruned: PrunedModel | str | Path,
    scheme: str = QuantizeSettings.scheme,
    *,
    group_size: int | None = None,
    keep_out: bool = True,
    device: str = "cpu",
    run_dir: str | Path | None = None,
    pretrained: str | None = None,
) -> PrunedModel:
    """`pruned` (a `PrunedModel`, quantized in place, or a run directory, loaded) with its
    denoiser's linears quantized by torchao (`QuantizeSettings`: `scheme` int8_weight_only,
    int8_dynamic, float8_weight_only, float8_dynamic or int4_weight_only with `group_size`),
    every layer on its family's do-not-compress list left in the model's dtype (`keep_out`).
    Every check (the device, the group size against every width) comes before anything loads.
    `run_dir`: the model saved there in the model's dtype with the quantization in its
    manifest, so that `load_pruned(run_dir)` gives it back quantized. `.quantization` says what
    was done (layers, bytes of weights in memory before and after, zeros kept exact)."""
    settings = QuantizeSettings(scheme, group_size, keep_out)
    target = resolve_device(device)
    if isinstance(pruned, PrunedModel):
        check_device(settings, target)
        check_widths(settings, linear_widths(pruned.adapter, pruned.denoiser, keep_out))
        model = pruned
    else:
        check_quantizable(pruned, settings, target, pretrained)
        model = load_pruned(pruned, pretrained)
        model.manifest["quantized_from"] = str(Path(pruned).resolve())
    model.pipeline.to(target)
    if run_dir is not None:  # the weights as they are, then the quantization in the manifest
        save_pruned(model, run_dir)
    quantize_pruned(model, settings, run_dir)
    return model


def evaluate(
    pipe: DiffusionPipeline | PrunedModel,
    prompts: Sequence[str] | EvalPrompts,
    *,
    out_dir: str | Path,
    metrics: Sequence[str] | None = None,
    sampling: dict[str, Any] | SamplingDefaults | None = None,
    device: str = PRUNE.device,
    dense: Evaluation | None = None,
    **options: Any,
) -> Evaluation:
    """Generate one image per prompt into `out_dir/images` (image i from the noise of seed + i)
    and score them; returns the evaluation (also in `out_dir/metrics.json`, the per-image
    scores in `out_dir/per_image.csv`). A `PrunedModel` brings its own sampling settings
    (`sampling`: a pipeline's, defaulted as `prune`'s); `dense`: the dense model's evaluation
    with the same settings (the reference of the dense-relative metrics and of
    `fid={"reference": "dense"}`).
    `metrics`: the metrics to compute (default: those `EvalOptions` turns on: clip_score);
    `options`: the eval group's keys (`EvalOptions`), a group as a dict of its keys, e.g.
    `seed=0, fid={"reference": "ref/"}, dense_relative={"lpips": None}`."""
    if isinstance(pipe, PrunedModel):
        pipeline, adapter = pipe.pipeline, pipe.adapter
    else:
        pipeline, adapter = pipe, in_memory_adapter(pipe, sampling)
    target = resolve_device(device)
    chosen = evaluation_options(metrics, **options)
    if dense is None:  # nothing to compare against
        chosen = replace(chosen, dense_relative=replace(chosen.dense_relative, enabled=False))
    settings = evaluation_settings(prompts, chosen, str(target))
    return evaluate_pipeline(pipeline.to(target), adapter, settings, Path(out_dir), dense=dense)


def evaluation_options(metrics: Sequence[str] | None = None, **options: Any) -> EvalOptions:
    """`EvalOptions` from keyword arguments (`obsdiff.evaluate`'s): a group as a dict of its
    keys or as its dataclass; `metrics` turns on exactly those metrics."""
    built = from_mapping(EvalOptions, options)
    return built if metrics is None else built.with_metrics(metrics)


def evaluation_settings(
    prompts: Sequence[str] | EvalPrompts,
    options: EvalOptions,
    device: str = "cpu",
    cache_dir: str | Path = "outputs/dense",
) -> EvalSettings:
    """The evaluation of `options` on `prompts`, every metric built and checked here, before
    any image is generated (the eval app builds its settings with this function).

    FID needs `fid.reference`: a folder of images, an `.npz` of statistics, `dense` (the dense
    model's images, in the run app) or `toy_dataset` (fresh toy images of the prompts,
    rendered once under `cache_dir`); `clip_score.model` `tiny` is the offline tiny CLIP; see
    `EvalOptions` for every key."""
    if not isinstance(prompts, EvalPrompts):
        listed = _prompt_list(prompts, "evaluation")
        prompts = EvalPrompts(list(range(len(listed))), listed, "python", "")
    prompts = prompts.repeated(options.images_per_prompt)
    cache = Path(cache_dir)
    classifier = functools.cache(load_classifier)  # the toy metrics share one classifier
    fid = None
    if options.fid.enabled:
        fid_options = options.fid
        if fid_options.reference is None:
            raise ValueError(
                "fid needs a reference (eval.fid.reference): a folder of images, an .npz of "
                f"statistics, {DENSE_REFERENCE} or {TOY_DATASET}"
            )
        if fid_options.mode not in FID_MODES:
            raise ValueError(
                f"eval.fid.mode={fid_options.mode!r}; use one of {', '.join(FID_MODES)}"
            )
        extractor = _fid_extractor(fid_options.extractor, classifier)
        if extractor is None:
            ensure_inception(fid_options.mode)  # fetched now, or one clear error: not later
        reference, reference_prompts = str(fid_options.reference), None
        if reference == TOY_DATASET:
            reference_prompts = prompts.prompts * TOY_REFERENCE_REPEATS
            reference = _toy_reference(reference_prompts, prompts, cache)
        fid = FIDSettings(
            reference, fid_options.mode, extractor, fid_options.batch_size, cache,
            reference_prompts,
        )  # fmt: skip
    text_image: list[TextImageMetric] = []
    if options.clip_score.enabled:
        clip_model = options.clip_score.model
        model = tiny_clip if clip_model == TINY else clip_model
        try:
            text_image.append(
                CLIPScore(model, device=device, batch_size=options.clip_score.batch_size)
            )
        except OSError as err:
            raise ValueError(
                f"eval.clip_score.model={clip_model!r} could not be loaded: "
                f"{str(err).splitlines()[0]}; on a machine without network access download it "
                "once (`hf download <id> --local-dir <folder>`) and set eval.clip_score.model="
                '<folder> (Python: clip_score={"model": <folder>}), or leave clip_score out'
            ) from err
    if options.prompt_fidelity.enabled:
        text_image.append(PromptFidelity(classifier(), device=device))
    if options.image_reward.enabled:
        reward = options.image_reward
        text_image.append(
            ImageReward(
                model=reward.model,
                python=reward.python,
                device=device,
                download_root=reward.download_root,
            )
        )
    relative = None
    if options.dense_relative.enabled:
        feature_distance = options.dense_relative.features
        if feature_distance not in (None, "toy_classifier"):
            raise ValueError(
                f"eval.dense_relative.features={feature_distance!r}; use toy_classifier or null"
            )
        lpips = options.dense_relative.lpips
        features = None if feature_distance is None else ClassifierFeatures(classifier())
        network = None if lpips is None else build_lpips(str(lpips))
        relative = DenseRelative(network, features, device=device)
    return EvalSettings(
        name=options.name,
        prompts=prompts,
        seed=options.seed,
        batch_size=options.batch_size,
        fid=fid,
        text_image=text_image,
        efficiency_repeats=options.efficiency.repeats,
        grid_size=options.grid_size,
        evaluate_dense=options.dense,
        dense_relative=relative,
        bootstrap=options.bootstrap,
        sampling=options.sampling_overrides(),
    )


def _fid_extractor(name: str, classifier: Any) -> nn.Module | None:
    """`inception` (clean-fid's, None), `tiny` (random features) or `toy_classifier`."""
    if name == "inception":
        return None
    if name == TINY:
        return RandomFeatures()
    if name == "toy_classifier":
        model: AttributeClassifier = classifier()
        return ClassifierFeatures(model)
    raise ValueError(f"eval.fid.extractor={name!r}; use one of {', '.join(FID_EXTRACTORS)}")


def _toy_reference(captions: list[str], prompts: EvalPrompts, cache_dir: Path) -> str:
    """Fresh toy-dataset images of `captions` (the evaluation prompts, repeated), rendered
    once."""
    key = prompts.describe()["prompts_sha256"][:16]
    folder = cache_dir / f"toy-reference-{key}-x{TOY_REFERENCE_REPEATS}"
    return str(render_folder(folder, captions, seed=TOY_REFERENCE_SEED))
