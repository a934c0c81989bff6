"""The Python API: prune, save, load and evaluate diffusers pipelines already in memory.

    import obsdiff
    pruned = obsdiff.prune(pipe, method="obsdiff", granularity="unstructured", sparsity=0.5,
                           prompts=prompts, packages=4, weighting="log_decrease")
    obsdiff.save_pruned(pruned, "my_run")
    pruned = obsdiff.load_pruned("my_run")
    scores = obsdiff.evaluate(pruned, prompts=eval_prompts, metrics=["clip_score"], out_dir="ev")

The pipeline's family is recognised from its class; methods, granularities and weighting
schemes go by the names of their config options (or are given as the objects the configs
build), with the options' defaults. The work is done by the functions the apps run
(`obsdiff.oneshot.run.prune_pipeline`, `obsdiff.eval.harness.evaluate_pipeline`), on the same
typed objects, so the two paths give the same results.
"""

from __future__ import annotations

import functools
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from diffusers import DiffusionPipeline
from torch import nn

from obsdiff.artifacts.export import export_pruned as export
from obsdiff.artifacts.pruned import PrunedModel, load_pruned, save_pruned
from obsdiff.calibration.sequential import CalibrationSettings, Placement
from obsdiff.eval.bootstrap import BootstrapSettings
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
from obsdiff.eval.tiny_backbones import RandomFeatures, tiny_clip
from obsdiff.methods import METHODS, Granularity, PruningMethod
from obsdiff.models import adapter_for
from obsdiff.models.base import DATA_DIR, ModelAdapter, adapter_from_config
from obsdiff.models.sampling import SamplingDefaults
from obsdiff.oneshot.checkpoint import remove_checkpoint
from obsdiff.oneshot.job import PruneJob, check_layout
from obsdiff.oneshot.plan import GB, MemoryPlan, choose_packages
from obsdiff.oneshot.plan import memory_plan as plan_memory
from obsdiff.oneshot.run import prune_pipeline
from obsdiff.prompts.eval_sets import EvalPrompts
from obsdiff.prompts.files import PromptSet
from obsdiff.pruning.schedules import TimestepWeighting
from obsdiff.toy.classifier import AttributeClassifier, ClassifierFeatures, load_classifier
from obsdiff.toy.data import render_folder
from obsdiff.toy.prompt_fidelity import PromptFidelity
from obsdiff.utils.devices import resolve_device


__all__ = [
    "evaluate",
    "evaluation_settings",
    "export",
    "load_pruned",
    "memory_plan",
    "prune",
    "save_pruned",
]

METRICS = ("fid", "clip_score", "prompt_fidelity", "image_reward")
FID_EXTRACTORS = ("inception", "tiny", "toy_classifier")
TINY = "tiny"
TOY_DATASET = "toy_dataset"
TOY_REFERENCE_SEED = 100_000  # the toy FID reference images: seeds unlike any generation's
TOY_REFERENCE_REPEATS = 2  # reference images per evaluation prompt (less noise on that side)
MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "conf" / "model"


def prune(
    pipe: DiffusionPipeline,
    method: str | PruningMethod = "obsdiff",
    granularity: str | Granularity = "unstructured",
    sparsity: float = 0.5,
    *,
    prompts: Sequence[str],
    packages: int = 4,
    weighting: str | TimestepWeighting = "log_decrease",
    sampling: dict[str, Any] | SamplingDefaults | None = None,
    batch_size: int = 4,
    seed: int = 0,
    include_uncond: bool = True,
    hessian_precision: str = "float32",
    blocks: tuple[int, int] | None = None,
    device: str = "auto",
    run_dir: str | Path | None = None,
    keep_checkpoint: bool = False,
    statistics_cache: str | Path | None = None,
    offload_statistics: bool = False,
    offload_components: bool = False,
    **method_options: Any,
) -> PrunedModel:
    """Prune `pipe` in place; returns it with its manifest and figures (`.result`: achieved
    sparsity, parameters, TFLOPs, seconds). `method_options` set the method's parameters (e.g.
    `compensate=False`); `run_dir` keeps a resumable checkpoint while it works (removed at the
    end unless `keep_checkpoint`) and writes the pruned model there, as the prune app does
    (else `save_pruned` writes it later). `offload_statistics` keeps the calibration
    statistics in CPU memory, `offload_components` all but the denoiser while pruning (the
    same weights either way). Every setting is checked before the first calibration pass."""
    if not prompts:
        raise ValueError("prompts is empty: give the calibration prompts (a list of strings)")
    job = _job(
        adapter_for(pipe, sampling),
        method,
        granularity,
        sparsity,
        weighting,
        packages,
        prompts,
        CalibrationSettings(batch_size, seed, include_uncond, hessian_precision),
        device,
        blocks,
        run_dir is not None,
        method_options,
    )
    if statistics_cache is not None:
        job.statistics_cache = Path(statistics_cache)
    job.placement = Placement(offload_statistics, offload_components)
    check_layout(job)
    if run_dir is not None:
        pruned = prune_pipeline(job, Path(run_dir))
        if not keep_checkpoint:
            remove_checkpoint(Path(run_dir))
        return pruned
    with tempfile.TemporaryDirectory(prefix="obsdiff-") as scratch:  # its checkpoint, then gone
        return prune_pipeline(job, Path(scratch))


def memory_plan(
    model: DiffusionPipeline | ModelAdapter | str,
    method: str | PruningMethod = "obsdiff",
    granularity: str | Granularity = "unstructured",
    sparsity: float = 0.5,
    *,
    packages: int | str = 4,
    memory_budget: float | None = None,
    blocks: tuple[int, int] | None = None,
    offload_statistics: bool = False,
    offload_components: bool = False,
    **method_options: Any,
) -> MemoryPlan:
    """What pruning `model` will hold on its device (`MemoryPlan`: weights per component,
    statistics per package, the costliest solve, the predicted peak; `.table()` prints it), from
    its architecture alone: no weights are loaded. `model`: a pipeline, an adapter, or the name
    of a model config (`conf/model/<name>.yaml`, e.g. "flux_dev": its config files ship with
    obsdiff). `packages="auto"` with `memory_budget` (GB) picks the fewest that fit."""
    if isinstance(model, str):
        model = model_from_config(model)
    elif not isinstance(model, ModelAdapter):
        model = adapter_for(model, None)
    auto = packages == "auto"
    if auto and memory_budget is None:
        raise ValueError("packages='auto' needs memory_budget=<GB of the device>")
    count = 1 if auto else int(packages)
    settings = CalibrationSettings()
    job = _job(model, method, granularity, sparsity, "log_decrease", count, [""], settings,
               "cpu", blocks, False, method_options)  # fmt: skip
    job.placement = Placement(offload_statistics, offload_components)
    components = model.component_skeletons()
    if auto:
        assert memory_budget is not None
        job = choose_packages(job, memory_budget * GB, components)
    return plan_memory(job, components)


def model_from_config(name: str) -> ModelAdapter:
    """The adapter of `conf/model/<name>.yaml` (a source checkout's config group), without
    Hydra: its keys are plain values but for `${obsdiff_data:<file>}`, a file shipped in
    obsdiff/data (the toy's pipeline)."""
    path = MODEL_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in MODEL_CONFIGS.glob("*.yaml"))
        raise ValueError(f"model={name!r}: no {path}; use one of {available}")
    text = re.sub(
        r"\$\{obsdiff_data:([^}]*)\}", lambda m: str(DATA_DIR / m.group(1)), path.read_text()
    )
    return adapter_from_config(yaml.safe_load(text))


def _job(
    adapter: ModelAdapter,
    method: str | PruningMethod,
    granularity: str | Granularity,
    sparsity: float,
    weighting: str | TimestepWeighting,
    packages: int,
    prompts: Sequence[str],
    calibration: CalibrationSettings,
    device: str,
    blocks: tuple[int, int] | None,
    save: bool,
    method_options: dict[str, Any],
) -> PruneJob:
    """A prune job from the API's names or objects (the options' defaults)."""
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"method={method!r}; use one of {', '.join(METHODS)}")
        method = METHODS[method](**method_options)  # type: ignore[call-arg]
    if isinstance(granularity, str):
        granularity = Granularity.from_name(granularity)
    if isinstance(weighting, str):
        weighting = TimestepWeighting(weighting)
    return PruneJob(
        model=adapter,
        model_config=adapter.describe(),
        method=method,
        granularity=granularity,
        sparsity=sparsity,
        weighting=weighting,
        packages=packages,
        prompts=PromptSet(list(prompts), "python", "", "given", None),
        calibration=calibration,
        device=resolve_device(device),
        blocks=blocks,
        save=save,
    )


def evaluate(
    pipe: DiffusionPipeline | PrunedModel,
    prompts: Sequence[str] | EvalPrompts,
    *,
    out_dir: str | Path,
    metrics: Sequence[str] = ("clip_score",),
    sampling: dict[str, Any] | SamplingDefaults | None = None,
    device: str = "auto",
    dense: Evaluation | None = None,
    **options: Any,
) -> Evaluation:
    """Generate one image per prompt into `out_dir/images` (image i from the noise of seed + i)
    and score them; returns the evaluation (also in `out_dir/metrics.json`, the per-image
    scores in `out_dir/per_image.csv`). A `PrunedModel` brings its own sampling settings;
    `dense`: the dense model's evaluation with the same settings (the reference of the
    dense-relative metrics and of `fid_reference="dense"`); `options` are those of
    `evaluation_settings` (seed, batch_size, fid_reference, clip_model, lpips, ...)."""
    if isinstance(pipe, PrunedModel):
        pipeline, adapter = pipe.pipeline, pipe.adapter
    else:
        pipeline, adapter = pipe, adapter_for(pipe, sampling)
    target = resolve_device(device)
    options.setdefault("dense_relative", dense is not None)  # nothing to compare against
    settings = evaluation_settings(prompts, metrics=metrics, device=str(target), **options)
    return evaluate_pipeline(pipeline.to(target), adapter, settings, Path(out_dir), dense=dense)


def evaluation_settings(
    prompts: Sequence[str] | EvalPrompts,
    *,
    metrics: Sequence[str] = ("clip_score",),
    name: str = "python",
    seed: int = 0,
    batch_size: int = 4,
    fid_reference: str | Path | None = None,
    fid_mode: str = "clean",
    fid_extractor: str = "inception",
    fid_batch_size: int = 32,
    clip_model: str = "openai/clip-vit-base-patch16",  # as conf/eval/coco2014_5k.yaml
    clip_batch_size: int = 32,
    image_reward_model: str = "ImageReward-v1.0",
    image_reward_python: str | None = None,
    image_reward_download_root: str | None = None,
    efficiency_repeats: int = 0,
    grid_size: int = 8,
    evaluate_dense: bool = False,
    images_per_prompt: int = 1,
    sampling: dict[str, Any] | None = None,
    dense_relative: bool = True,
    lpips: str | None = "alex",
    feature_distance: str | None = None,
    bootstrap_resamples: int = 2000,
    fid_resamples: int = 200,
    confidence: float = 0.95,
    bootstrap_seed: int = 0,
    device: str = "cpu",
    cache_dir: str | Path = "outputs/dense",
) -> EvalSettings:
    """Evaluation settings from typed values, every metric built and checked here, before any
    image is generated (the eval app builds its settings with this function).

    `metrics`: any of fid, clip_score, prompt_fidelity (the toy's), image_reward. FID needs
    `fid_reference`: a folder of images, an `.npz` of statistics, `dense` (the dense model's
    images, in the run app) or `toy_dataset` (fresh toy images of the prompts, rendered once
    under `cache_dir`); `fid_extractor`: inception, tiny (random features) or toy_classifier.
    `clip_model` `tiny` is the offline tiny CLIP. `images_per_prompt` images of each prompt
    (seeds seed + i * n + j). `sampling`: other steps, guidance or scheduler than the model's
    for the evaluation images only (e.g. {"guidance_scale": 9.0, "scheduler":
    "FlowMatchHeunDiscreteScheduler"}). `dense_relative`: PSNR, SSIM, LPIPS (`lpips`: alex,
    vgg, squeeze, tiny or None) and the latent error against a dense evaluation of the same
    settings, where one is given, plus the distance in the toy classifier's features
    (`feature_distance`: toy_classifier). Intervals: BCa bootstrap over prompts,
    `bootstrap_resamples` resamples (FID: `fid_resamples`, normal interval), seeded by
    `bootstrap_seed`."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"metrics={list(metrics)}: {unknown} unknown; use any of {METRICS}")
    if not isinstance(prompts, EvalPrompts):
        if not prompts:
            raise ValueError("prompts is empty: give the evaluation prompts (a list of strings)")
        prompts = EvalPrompts(list(range(len(prompts))), list(prompts), "python", "")
    prompts = prompts.repeated(images_per_prompt)
    bootstrap = BootstrapSettings(bootstrap_resamples, fid_resamples, confidence, bootstrap_seed)
    cache = Path(cache_dir)
    classifier = functools.cache(load_classifier)  # the toy metrics share one classifier
    fid = None
    if "fid" in metrics:
        if fid_reference is None:
            raise ValueError(
                "fid needs a reference (eval.fid.reference): a folder of images, an .npz of "
                f"statistics, {DENSE_REFERENCE} or {TOY_DATASET}"
            )
        if fid_mode not in FID_MODES:
            raise ValueError(f"eval.fid.mode={fid_mode!r}; use one of {', '.join(FID_MODES)}")
        extractor = _fid_extractor(fid_extractor, classifier)
        if extractor is None:
            ensure_inception(fid_mode)  # fetched now, or one clear error: not after the images
        reference, reference_prompts = str(fid_reference), None
        if reference == TOY_DATASET:
            reference_prompts = prompts.prompts * TOY_REFERENCE_REPEATS
            reference = _toy_reference(reference_prompts, prompts, cache)
        fid = FIDSettings(reference, fid_mode, extractor, fid_batch_size, cache, reference_prompts)
    text_image: list[TextImageMetric] = []
    if "clip_score" in metrics:
        model = tiny_clip if clip_model == TINY else clip_model
        try:
            text_image.append(CLIPScore(model, device=device, batch_size=clip_batch_size))
        except OSError as err:
            raise ValueError(
                f"eval.clip_score.model={clip_model!r} could not be loaded: "
                f"{str(err).splitlines()[0]}; on a machine without network access download it "
                "once (`hf download <id> --local-dir <folder>`) and set eval.clip_score.model="
                "<folder> (Python: clip_model=<folder>), or leave clip_score out"
            ) from err
    if "prompt_fidelity" in metrics:
        text_image.append(PromptFidelity(classifier(), device=device))
    if "image_reward" in metrics:
        text_image.append(
            ImageReward(
                model=image_reward_model,
                python=image_reward_python,
                device=device,
                download_root=image_reward_download_root,
            )
        )
    relative = None
    if dense_relative:
        if feature_distance not in (None, "toy_classifier"):
            raise ValueError(
                f"eval.dense_relative.features={feature_distance!r}; use toy_classifier or null"
            )
        features = None if feature_distance is None else ClassifierFeatures(classifier())
        network = None if lpips is None else build_lpips(str(lpips))
        relative = DenseRelative(network, features, device=device)
    return EvalSettings(
        name=name,
        prompts=prompts,
        seed=seed,
        batch_size=batch_size,
        fid=fid,
        text_image=text_image,
        efficiency_repeats=efficiency_repeats,
        grid_size=grid_size,
        evaluate_dense=evaluate_dense,
        dense_relative=relative,
        bootstrap=bootstrap,
        sampling=dict(sampling or {}),
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
