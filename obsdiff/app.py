"""What the Hydra apps share: one shell with one failure policy, settings turned into typed
objects, the run directory's records, the eval and tracking groups turned into objects.

The shell (`execute`) runs every app in the same order: check every setting (typed values, the
model's layout from its config, the runner, the run directory) before any weights are loaded;
only then write the run directory (`config.yaml`, `.hydra/`, the log file, `results.json` with
`status: running`), do the work, and record `status: completed`. A bad setting is one message
naming the key: exit code 2 when run alone (and no run directory left behind), a `failed`
results.json inside a multirun, whose other jobs go on and whose exit status is 1 when any job
did not complete (`SweepStatus`). A run directory that holds a run of other settings is refused
before anything is written to it; one that holds the same run, completed, is left as it is (a
re-run sweep skips its finished jobs). Ctrl-C records `status: interrupted` and says how to
resume.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from obsdiff.calibration.prompts import BUNDLED_PROMPTS, PromptFileError, load_prompts
from obsdiff.calibration.sequential import CalibrationSettings
from obsdiff.config import ConfigError, instantiate, instantiate_model, to_plain
from obsdiff.eval.clip_score import CLIPScore
from obsdiff.eval.fid import FID_MODES, ensure_inception
from obsdiff.eval.image_reward import ImageReward, ImageRewardUnavailable
from obsdiff.eval.prompt_sets import EvalPrompts, coco_captions, prompt_file
from obsdiff.eval.tiny_backbones import RandomFeatures, tiny_clip
from obsdiff.eval.tracking import WandbLogger, resolve_mode
from obsdiff.evaluation import EvalSettings, FIDSettings, TextImageMetric
from obsdiff.methods.base import PruningMethod
from obsdiff.methods.granularity import Granularity
from obsdiff.models.base import ModelLoadError
from obsdiff.pruning.schedules import TimestepWeighting
from obsdiff.runners.fabric import RunnerSettings, launch
from obsdiff.runners.parallel import DataParallel
from obsdiff.toy.classifier import AttributeClassifier, ClassifierFeatures, load_classifier
from obsdiff.toy.data import render_folder
from obsdiff.toy.prompt_fidelity import PromptFidelity
from obsdiff.utils.devices import resolve_device
from obsdiff.utils.io import write_json, write_text
from obsdiff.utils.progress import quiet_library_bars
from obsdiff.workflow import JobError, PruneJob, check_layout, remove_checkpoint


log = logging.getLogger(__name__)

TAG_KEYS = ("model", "method", "granularity", "sparsity", "weighting", "packages", "eval_set")
BUNDLED_EVAL_PROMPTS = BUNDLED_PROMPTS.with_name("eval_prompts.txt")
TINY = "tiny"
TOY_DATASET = "toy_dataset"
TOY_REFERENCE_SEED = 100_000  # the toy FID reference images: seeds unlike any generation's
TOY_REFERENCE_REPEATS = 2  # reference images per evaluation prompt (less noise on that side)
RESULTS = "results.json"
CONFIG = "config.yaml"
REFUSED = (
    ".refused"  # in a sweep directory: the jobs refused because their directory held another run
)
# Keys that do not change what a run computes: a run directory may be resumed with other values.
NEUTRAL_KEYS = ("paths", "device", "runner", "tracking", "keep_checkpoint")
MAX_SHOWN = 8  # differences named when a run directory is refused
EXIT_SETTING = 2
EXIT_INTERRUPTED = 130

# A bad setting: one message, exit code 2 (a multirun records it and goes on). Before any work
# every ValueError is one (the checks raise them); once working, only these named kinds are, so
# that a bug still shows its traceback.
SETTING_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    JobError,
    PromptFileError,
    ModelLoadError,
    ImageRewardUnavailable,
    FileNotFoundError,
    ValueError,
    OmegaConfBaseException,  # an interpolation that does not resolve, a missing ??? value
)
WORK_SETTING_ERRORS: tuple[type[Exception], ...] = (ModelLoadError, JobError, ConfigError)

T = TypeVar("T")


class RunDirectoryError(ValueError):
    """The run directory holds a run of other settings."""


# ------------------------------------------------------------------------- typed settings
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


def identity(cfg: DictConfig) -> dict[str, Any]:
    """What names a run in a sweep (also for a run that failed before anything was built)."""
    choices = HydraConfig.get().runtime.choices
    names = {"model": choices.get("model")}
    if "method" in cfg:
        names |= {
            "method": choices.get("method"),
            "granularity": choices.get("granularity"),
            "sparsity": cfg.get("sparsity"),
            "weighting": choices.get("weighting"),
            "packages": cfg.get("packages"),
        }
    if "eval" in cfg:
        names["eval_set"] = choices.get("eval")
    return names


def build_prune_job(cfg: DictConfig) -> PruneJob:
    """The composed prune (or run) config as a validated job, with the model's layout checked
    from its architecture alone: nothing is loaded here."""
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
    job = PruneJob(
        model=instantiate_model(cfg.model),
        model_config=to_plain(cfg.model),
        method=instantiate(cfg.method, PruningMethod, "method"),  # type: ignore[type-abstract]
        granularity=instantiate(cfg.granularity, Granularity, "granularity"),
        sparsity=number(cfg, "sparsity", float, "0.5"),
        weighting=instantiate(cfg.weighting, TimestepWeighting, "weighting"),
        packages=number(cfg, "packages", int, "4"),
        prompts=prompts,
        calibration=CalibrationSettings(
            batch_size=number(cfg, "calibration.batch_size", int, "4"),
            seed=seed,
            include_uncond=bool(calibration.include_uncond),
            hessian_precision=str(calibration.hessian_precision),
        ),
        device=resolve_device(str(cfg.device)),
        config=to_plain(cfg),
        blocks=block_range(cfg.blocks),
        save=bool(cfg.save),
        keep_checkpoint=bool(cfg.get("keep_checkpoint", False)),
    )
    check_layout(job)
    return job


# ------------------------------------------------------------------------- run directory
def run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def is_multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_id() -> str | None:
    """The sweep's directory name (its start time) in a multirun, else None."""
    return Path(HydraConfig.get().sweep.dir).name if is_multirun() else None


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def setting_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every setting that changes what a run computes."""
    a, b = _flat(old), _flat(new)
    missing = object()

    def shown(value: Any) -> str:
        return "(unset)" if value is missing else repr(value)

    return [
        f"{key}: {shown(a.get(key, missing))} -> {shown(b.get(key, missing))}"
        for key in sorted(set(a) | set(b))
        if key.split(".")[0] not in NEUTRAL_KEYS and a.get(key, missing) != b.get(key, missing)
    ]


def check_run_dir(out: Path, config: dict[str, Any]) -> None:
    """Refuse a directory that holds a run of other settings (its `config.yaml` says which)."""
    previous = out / CONFIG
    if not previous.is_file():
        return
    try:
        old = OmegaConf.to_container(OmegaConf.load(previous))
    except Exception as err:  # not YAML, or not a mapping: not a run of ours to resume
        raise RunDirectoryError(
            f"{out} holds a config.yaml that cannot be read ({type(err).__name__}); nothing was "
            "changed there. Start a new run without hydra.run.dir (or with a new directory)."
        ) from None
    if not isinstance(old, dict):
        raise RunDirectoryError(f"{out}/config.yaml is not a run's config; use a new directory")
    differences = setting_differences(old, config)  # type: ignore[arg-type]
    if len(differences) > MAX_SHOWN:
        more = len(differences) - MAX_SHOWN
        differences = [*differences[:MAX_SHOWN], f"and {more} more"]
    if differences:
        raise RunDirectoryError(
            f"{out} holds a run with other settings ({'; '.join(differences)}); nothing was "
            "changed there. Resume it with its own settings, or start a new run without "
            "hydra.run.dir (or with a new directory)."
        )


def prepare_run_dir(out: Path, cfg: DictConfig, names: dict[str, Any]) -> logging.Handler:
    """The run is accepted: its config, Hydra's records, the log file, `status: running`."""
    hydra_cfg = HydraConfig.get()
    hydra_dir = out / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    write_text(out / CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
    write_text(hydra_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    write_text(hydra_dir / "hydra.yaml", OmegaConf.to_yaml({"hydra": hydra_cfg}))
    write_text(hydra_dir / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task))
    handler = logging.FileHandler(out / f"{hydra_cfg.job.name}.log")
    console = next(iter(logging.getLogger().handlers), None)
    if console is not None and console.formatter is not None:
        handler.setFormatter(console.formatter)
    logging.getLogger().addHandler(handler)
    mark(out, "running", names)
    return handler


def mark(out: Path, status: str, names: dict[str, Any], error: str | None = None) -> None:
    """results.json of a run that has not completed (running, interrupted or failed)."""
    record: dict[str, Any] = {"status": status, **names}
    if error is not None:
        record["error"] = error
    write_json(out / RESULTS, record)


# ------------------------------------------------------------------------- the shell
@dataclass
class RunContext:
    """What the work of an app gets: its directory, device, rank and W&B logger (rank 0)."""

    out: Path
    device: torch.device
    parallel: DataParallel
    logger: WandbLogger | None = None


def execute(
    cfg: DictConfig,
    validate: Callable[[], tuple[T, torch.device]],
    work: Callable[[T, RunContext], dict[str, Any]],
    names: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Run one app job under the failure policy (module docstring); returns its results, or
    None when it failed inside a multirun."""
    quiet_library_bars()
    out = run_dir()
    names = identity(cfg) if names is None else names
    fresh = not any(out.iterdir())  # Hydra has just created it (it writes nothing else there)
    try:  # the cheap checks first: a refused directory is refused before anything is built
        runner = runner_settings(cfg.runner) if "runner" in cfg else RunnerSettings()
        if "tracking" in cfg:
            resolve_mode(str(cfg.tracking.mode))
        check_run_dir(out, to_plain(cfg))
        job, device = validate()
    except SETTING_ERRORS as err:
        _refuse(err, out, names, fresh)
        return None
    except KeyboardInterrupt:
        _interrupted(out, None, fresh)
    finally:
        if fresh and not out.exists():  # refused: no empty run folders left behind either
            _remove_empty_parents(out, Path(cfg.paths.output_root) if "paths" in cfg else None)
    previous = _completed(out)
    if previous is not None:  # the same settings, finished: a resumed sweep skips it
        log.info("%s already holds this run, completed; nothing to do", out)
        return previous
    status, main, log_file = "failed", True, None
    context: RunContext | None = None
    try:
        device, parallel = launch(runner, device)
        main = parallel.is_main
        if not main:
            logging.getLogger().setLevel(logging.WARNING)  # rank 0 tells the story
        context = RunContext(out, device, parallel)
        if main:
            log_file = prepare_run_dir(out, cfg, names)
            if "tracking" in cfg:
                context.logger = build_logger(cfg.tracking, out, to_plain(cfg), names)
        results = {"status": "completed", **names, **work(job, context)}
        if main:
            record_run(out, results, context.logger)
            if not cfg.get("keep_checkpoint", False):
                remove_checkpoint(out)
        status = "completed"
    except KeyboardInterrupt:
        status = "interrupted"
        _interrupted(out, names if main else None, False)
    except WORK_SETTING_ERRORS as err:  # found while working (a model that does not load, ...)
        log.error("%s", err)
        if main:
            mark(out, "failed", names, str(err))
        if not is_multirun():
            sys.exit(EXIT_SETTING)
        return None
    except Exception as err:
        if main:
            mark(out, "failed", names, repr(err))
        if not is_multirun():
            raise
        # a sweep records the failure (traceback in the log) and goes on; SweepStatus reports it
        log.exception("job failed: %s", out)
        return None
    finally:
        if context is not None and context.logger is not None:
            context.logger.finish(status)
        if status == "completed":
            log.info("run directory: %s", out)
        if log_file is not None:
            logging.getLogger().removeHandler(log_file)
            log_file.close()
    return results


def _completed(out: Path) -> dict[str, Any] | None:
    """The results of a completed run in `out` (whose settings `check_run_dir` has matched)."""
    if not (out / CONFIG).is_file() or not (out / RESULTS).is_file():
        return None
    try:
        results = json.loads((out / RESULTS).read_text())
    except ValueError:
        return None
    return results if isinstance(results, dict) and results.get("status") == "completed" else None


def _refuse(err: Exception, out: Path, names: dict[str, Any], fresh: bool) -> None:
    """A bad setting found before any work: one message; alone, exit 2 and no run directory
    left behind; in a multirun, a failed results.json (unless the directory holds another
    run, which stays untouched) and the sweep goes on."""
    log.error("%s", err)
    if not is_multirun():
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        sys.exit(EXIT_SETTING)
    if isinstance(err, RunDirectoryError):  # its directory must not change: note it beside
        refused = Path(HydraConfig.get().sweep.dir) / REFUSED
        refused.mkdir(parents=True, exist_ok=True)
        write_text(refused / f"{out.name}.txt", f"{out}: refused: {err}\n")
    else:
        mark(out, "failed", names, str(err))


def _remove_empty_parents(out: Path, root: Path | None) -> None:
    if root is None:
        return
    root = root.resolve()
    for parent in out.resolve().parents:
        if parent == root or root not in parent.parents or any(parent.iterdir()):
            return
        parent.rmdir()


def _interrupted(out: Path, names: dict[str, Any] | None, fresh: bool) -> NoReturn:
    """Ctrl-C: record `interrupted` and say, in one line, how to resume."""
    if names is not None:
        mark(out, "interrupted", names, "interrupted (Ctrl-C) before it finished")
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
        log.error("interrupted before the run started; nothing was written")
    elif is_multirun():
        sweep = HydraConfig.get().sweep.dir
        log.error("interrupted; resume with the same command plus %s", _override("sweep", sweep))
    else:
        log.error("interrupted; resume with the same command plus %s", _override("run", out))
    sys.exit(EXIT_INTERRUPTED)


def _override(kind: str, directory: str | Path) -> str:
    """`hydra.run.dir=<dir>` as it must be typed in a shell (quoted when it needs to be)."""
    plain = f"hydra.{kind}.dir={directory}"
    return plain if shlex.quote(plain) == plain else shlex.quote(f'hydra.{kind}.dir="{directory}"')


class SweepStatus(Callback):
    """After a multirun: one line per job that did not complete (or was refused: its directory
    held a run of other settings), and exit status 1 if any."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        shutil.rmtree(Path(str(config.hydra.sweep.dir)) / REFUSED, ignore_errors=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        bad = [f.read_text().strip() for f in sorted((sweep / REFUSED).glob("*.txt"))]
        for results in sorted(sweep.glob(f"*/{RESULTS}")):
            try:
                record = json.loads(results.read_text())
            except ValueError:
                record = {"status": "unreadable"}
            if record.get("status") != "completed":
                bad.append(f"{results.parent}: {record.get('status')}: {record.get('error', '')}")
        if bad:
            log.error("%d job(s) of the sweep did not complete:\n%s", len(bad), "\n".join(bad))
            sys.exit(1)


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

    def whole(key: str, example: str, minimum: int = 1) -> int:
        return number(node, key, int, example, minimum=minimum, prefix="eval.")

    prompts = eval_prompts(node.prompts)
    seed, batch_size = whole("seed", "0", minimum=0), whole("batch_size", "4")
    repeats, grid_size = whole("efficiency.repeats", "3", 0), whole("grid_size", "8", 0)
    classifier = functools.cache(load_classifier)  # the toy metrics share one classifier
    fid = None
    if node.fid.enabled:
        mode = str(node.fid.mode)
        if mode not in FID_MODES:
            raise ConfigError(f"eval.fid.mode={mode!r}; use one of {', '.join(FID_MODES)}")
        extractor = fid_extractor(str(node.fid.extractor), classifier)
        if extractor is None:
            ensure_inception(mode)  # fetched now, or one clear error: not after the images
        fid_batch = whole("fid.batch_size", "32")
        reference = fid_reference(str(node.fid.reference), prompts, cache_dir)
        fid = FIDSettings(reference, mode, extractor, fid_batch, cache_dir)
    text_image: list[TextImageMetric] = []
    if node.clip_score.enabled:
        model = tiny_clip if node.clip_score.model == TINY else str(node.clip_score.model)
        try:
            clip = CLIPScore(model, device=device, batch_size=whole("clip_score.batch_size", "32"))
        except OSError as err:
            raise ConfigError(
                f"eval.clip_score.model={model!r} could not be loaded: "
                f"{str(err).splitlines()[0]}; on a machine without network access download it "
                "once (`hf download <id> --local-dir <folder>`) and set eval.clip_score.model="
                "<folder>, or eval.clip_score.enabled=false"
            ) from err
        text_image.append(clip)
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
        seed=seed,
        batch_size=batch_size,
        fid=fid,
        text_image=text_image,
        efficiency_repeats=repeats,
        grid_size=grid_size,
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
    write_json(out / RESULTS, results)
    if results.get("eval") or results.get("dense"):
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
