"""What the Hydra apps share: the eval and tracking groups turned into objects, run identity,
and failure handling (one clear message; in a sweep the failure is recorded and the sweep goes
on; a single run exits with code 2 for a bad setting)."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from torch import nn

from obsdiff.calibration.prompts import BUNDLED_PROMPTS
from obsdiff.eval.clip_score import CLIPScore
from obsdiff.eval.image_reward import ImageReward
from obsdiff.eval.prompt_fidelity import PromptFidelity
from obsdiff.eval.prompt_sets import EvalPrompts, coco_captions, prompt_file
from obsdiff.eval.tiny_backbones import RandomFeatures, tiny_clip
from obsdiff.eval.tracking import WandbLogger
from obsdiff.evaluation import EvalSettings, FIDSettings, TextImageMetric
from obsdiff.pruned import write_json
from obsdiff.toy.classifier import AttributeClassifier, ClassifierFeatures, load_classifier
from obsdiff.toy.data import render_folder


log = logging.getLogger(__name__)

TAG_KEYS = ("model", "method", "granularity", "sparsity", "weighting", "packages", "eval_set")
BUNDLED_EVAL_PROMPTS = BUNDLED_PROMPTS.with_name("eval_prompts.txt")
TINY = "tiny"
TOY_DATASET = "toy_dataset"
TOY_REFERENCE_SEED = 100_000  # the toy FID reference images: seeds unlike any generation's
TOY_REFERENCE_REPEATS = 2  # reference images per evaluation prompt (less noise on that side)


class JobFailed(RuntimeError):
    """A sweep job failed; its results.json says why (Hydra records it and runs the others)."""


def run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def is_multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_id() -> str | None:
    """The sweep's directory name (its start time) in a multirun, else None."""
    return Path(HydraConfig.get().sweep.dir).name if is_multirun() else None


def fail(message: str, identity: dict[str, Any], code: int = 2) -> NoReturn:
    """Log, record `status: failed` in results.json, then exit (single run) or raise (sweep)."""
    log.error("%s", message)
    write_json(run_dir() / "results.json", {"status": "failed", "error": message, **identity})
    if is_multirun():
        raise JobFailed(message)
    sys.exit(code)


def eval_prompts(node: DictConfig) -> EvalPrompts:
    source = str(node.source)
    if source == "coco":
        return coco_captions(node.path, node.num_prompts, seed=int(node.subset_seed))
    if source in ("file", "bundled"):
        path = BUNDLED_EVAL_PROMPTS if source == "bundled" else node.path
        return prompt_file(path, node.num_prompts, fmt=str(node.format), column=str(node.column))
    raise ValueError(f"eval.prompts.source={source!r}; use bundled, coco or file")


def fid_extractor(name: str, classifier: Callable[[], AttributeClassifier]) -> nn.Module | None:
    """`inception` (clean-fid's, None), `tiny` (random features) or `toy_classifier`."""
    if name == "inception":
        return None
    if name == TINY:
        return RandomFeatures()
    if name == "toy_classifier":
        return ClassifierFeatures(classifier())
    raise ValueError(f"eval.fid.extractor={name!r}; use inception, tiny or toy_classifier")


def fid_reference(reference: str, prompts: EvalPrompts, cache_dir: Path) -> str:
    """`toy_dataset`: fresh toy-dataset images of the evaluation prompts, rendered once."""
    if reference != TOY_DATASET:
        return reference
    key = prompts.describe()["prompts_sha256"][:16]
    folder = cache_dir / f"toy-reference-{key}-x{TOY_REFERENCE_REPEATS}"
    captions = prompts.prompts * TOY_REFERENCE_REPEATS
    return str(render_folder(folder, captions, seed=TOY_REFERENCE_SEED))


def build_eval(
    node: DictConfig, device: str = "cpu", cache_dir: Path = Path("outputs/dense")
) -> EvalSettings:
    """The `eval` group as settings; every file and backend is checked here, before any work
    (`cache_dir`: where the toy FID reference is rendered, paths.dense_cache)."""
    prompts = eval_prompts(node.prompts)
    classifier = functools.cache(load_classifier)  # the toy metrics share one classifier
    fid = None
    if node.fid.enabled:
        extractor = fid_extractor(str(node.fid.extractor), classifier)
        reference = fid_reference(str(node.fid.reference), prompts, cache_dir)
        fid = FIDSettings(
            reference=reference,
            mode=str(node.fid.mode),
            extractor=extractor,
            batch_size=int(node.fid.batch_size),
            cache_dir=cache_dir,
        )
    text_image: list[TextImageMetric] = []
    if node.clip_score.enabled:
        model = tiny_clip if node.clip_score.model == TINY else str(node.clip_score.model)
        text_image.append(
            CLIPScore(model, device=device, batch_size=int(node.clip_score.batch_size))
        )
    if node.get("prompt_fidelity", {}).get("enabled", False):
        text_image.append(PromptFidelity(classifier(), device=device))
    if node.image_reward.enabled:
        text_image.append(
            ImageReward(
                model=str(node.image_reward.model),
                python=node.image_reward.python,
                device=device,
                download_root=node.image_reward.download_root,
            )
        )
    return EvalSettings(
        name=str(node.name),
        prompts=prompts,
        seed=int(node.seed),
        batch_size=int(node.batch_size),
        fid=fid,
        text_image=text_image,
        efficiency_repeats=int(node.efficiency.repeats),
        grid_size=int(node.grid_size),
        evaluate_dense=bool(node.dense),
    )


def build_logger(
    node: DictConfig, directory: Path, config: dict[str, Any], tags: dict[str, Any]
) -> WandbLogger:
    """A W&B run in `directory`, grouped by sweep id, tagged `key:value` by the run's settings."""
    group = node.group if node.group is not None else sweep_id()
    labels = [f"{k}:{tags[k]}" for k in TAG_KEYS if tags.get(k) is not None]
    return WandbLogger(
        project=str(node.project),
        directory=directory,
        mode=str(node.mode),
        entity=node.entity,
        name=directory.name if group is None else f"{group}/{directory.name}",
        group=group,
        tags=[t[:64] for t in labels + [str(t) for t in node.tags]],  # W&B: at most 64 characters
        config=config,
    )


def record_run(out: Path, results: dict[str, Any], logger: WandbLogger | None) -> None:
    """results.json, the dense-vs-pruned table in the log, and W&B (rank 0)."""
    write_json(out / "results.json", results)
    log.info("%s\n%s", out, summary_table(results))
    if logger is not None:
        log_run(logger, results)


def log_run(logger: WandbLogger, results: dict[str, Any]) -> None:
    """Metrics (prune/, eval/, dense/ namespaces), the fixed-prompt grids and a results row."""
    flat: dict[str, Any] = {}
    for key, value in results.items():
        if isinstance(value, dict) and key in ("eval", "dense"):
            flat.update({f"{key}/{k}": v for k, v in value.items() if _is_number(v)})
        elif _is_number(value):
            flat[f"prune/{key}"] = value
    logger.log_metrics(flat)
    logger.set_summary(flat)
    for key in ("eval", "dense"):
        section = results.get(key)
        if section and Path(section.get("grid", "")).is_file():
            prompts = section.get("grid_prompts", [])
            logger.log_image_file(f"{key}/grid", Path(section["grid"]), " | ".join(prompts))
    columns = [k for k in flat if not k.startswith("dense/")]
    logger.log_table("results", columns, [[flat[k] for k in columns]])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


SUMMARY_KEYS = (
    "fid",
    "prompt_fidelity",
    "clip_score",
    "image_reward",
    "params",
    "tflops_per_forward",
    "seconds_per_image",
)


def summary_table(results: dict[str, Any]) -> str:
    """A short dense-vs-pruned table of the headline metrics (for the log)."""
    pruned, dense = results.get("eval") or {}, results.get("dense") or {}
    keys = [k for k in SUMMARY_KEYS if k in pruned or k in dense]
    title = f"{results.get('method')} {results.get('granularity')} {results.get('sparsity')}"
    lines = [f"{'metric':<20} {'dense':>12} {title:>28}"]
    for key in keys:
        lines.append(f"{key:<20} {_cell(dense.get(key)):>12} {_cell(pruned.get(key)):>28}")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
