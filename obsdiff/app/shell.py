"""What the Hydra apps share: one shell with one failure policy, the run directory, the run
record (written here and nowhere else), the log's summary and W&B.

The shell (`execute`) runs every app in the same order: hold the run directory (`run.lock`: a
second process there is refused at once, exit code 2, naming the holder), check every setting
(typed values, the model's layout from its config, the runner, the run directory) before any
weights are loaded; only then write the run directory (`config.yaml`, `.hydra/`, the log file,
`results.json` with `status: running`), do the work, and record `status: completed`. A bad
setting is one message naming the key: exit code 2 when run alone (and no run directory left
behind), a `failed` results.json inside a multirun, whose other jobs go on and whose exit status
is 1 when any job did not complete (`SweepStatus`). A run directory that holds a run of other
settings is refused with nothing of it changed; one that holds the same run, completed, is left
as it is (a re-run sweep skips its finished jobs). Ctrl-C and SIGTERM record `status:
interrupted` and say how to resume (exit codes 130 and 143); a write the filesystem refuses
mid-run (a full disk) is one message naming the file, what was kept and how to resume (exit
code 1).
"""

from __future__ import annotations

import logging
import shlex
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch
from diffusers import DiffusionPipeline
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from obsdiff.app.config import ConfigError, to_plain
from obsdiff.app.settings import identity, is_multirun, runner_settings, task_overrides
from obsdiff.artifacts.lock import RunDirectoryBusy, RunLock
from obsdiff.artifacts.pruned import PrunedRunError
from obsdiff.artifacts.record import (
    RESULTS,
    RecordError,
    RunIdentity,
    RunRecord,
    evaluation_numbers,
)
from obsdiff.artifacts.tracking import WandbLogger, resolve_mode
from obsdiff.eval.harness import EvalSettings, latency_against_dense, with_latency
from obsdiff.eval.image_reward import ImageRewardUnavailable
from obsdiff.models.base import ModelAdapter
from obsdiff.models.loading import ModelLoadError
from obsdiff.oneshot.checkpoint import CHECKPOINT_DIR, remove_checkpoint
from obsdiff.oneshot.job import JobError
from obsdiff.prompts.files import PromptFileError
from obsdiff.quantization import QuantizeError
from obsdiff.recovery.checkpoint import remove_recovery_checkpoint
from obsdiff.recovery.loop import Divergence
from obsdiff.runners.fabric import RunnerSettings, launch
from obsdiff.runners.parallel import DataParallel
from obsdiff.utils.io import WriteError, is_write_failure, write_text
from obsdiff.utils.progress import quiet_library_bars


log = logging.getLogger(__name__)

TAG_KEYS = (
    "model", "method", "granularity", "sparsity", "weighting", "packages", "eval_set", "quantize",
)  # fmt: skip
CONFIG = "config.yaml"
REFUSED = (
    ".refused"  # in a sweep directory: the jobs refused because their directory held another run
)
# Keys that do not change what a run computes: a run directory may be resumed with other values.
NEUTRAL_KEYS = ("paths", "device", "runner", "tracking", "keep_checkpoint", "offload")
MAX_SHOWN = 8  # differences named when a run directory is refused
EXIT_SETTING = 2
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report it
EXIT_TERMINATED = 143  # SIGTERM

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
WORK_SETTING_ERRORS: tuple[type[Exception], ...] = (
    ModelLoadError,
    JobError,
    ConfigError,
    PrunedRunError,
    QuantizeError,  # a structured prune left a width the int4 group size does not divide
)

T = TypeVar("T")


class RunDirectoryError(ValueError):
    """The run directory holds a run of other settings."""


# ------------------------------------------------------------------------- run directory
def run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def sweep_id() -> str | None:
    """The sweep's directory name (its start and the process id) in a multirun, else None."""
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


def prepare_run_dir(out: Path, cfg: DictConfig, names: RunIdentity) -> logging.Handler:
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


def mark(out: Path, status: str, names: RunIdentity, error: str | None = None) -> None:
    """The record of a run that has not completed (running, interrupted or failed)."""
    RunRecord(status, names, task_overrides(), error).write(out)


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
    work: Callable[[T, RunContext], RunRecord],
    names: RunIdentity | None = None,
) -> RunRecord | None:
    """Run one app job under the failure policy (module docstring); returns its record, or
    None when it failed inside a multirun. `work` returns the record's sections (prune, eval,
    dense, images); the shell adds the identity and the overrides and writes it, once."""
    quiet_library_bars()
    out = run_dir()
    names = identity(cfg) if names is None else names
    fresh = not any(out.iterdir())  # Hydra has just created it (it writes nothing else there)
    lock = RunLock(out)
    try:
        lock.acquire()
    except RunDirectoryBusy as err:
        _refuse(err, out, names, fresh=False)
        return None
    except OSError as err:  # the lock file cannot be made (permissions changed, a full disk)
        _write_failed(WriteError(lock.path, None, err.strerror or str(err), err.errno), out, None)
        return None
    try:
        with _signals_as_interruptions():
            return _execute(cfg, validate, work, names, out, fresh)
    finally:
        lock.release()


def _execute(
    cfg: DictConfig,
    validate: Callable[[], tuple[T, torch.device]],
    work: Callable[[T, RunContext], RunRecord],
    names: RunIdentity,
    out: Path,
    fresh: bool,
) -> RunRecord | None:
    try:  # the cheap checks first: a refused directory is refused before anything is built
        trains = cfg.get("recover") is not None
        runner = runner_settings(cfg.runner, trains) if "runner" in cfg else RunnerSettings()
        if "tracking" in cfg:
            resolve_mode(str(cfg.tracking.mode))
        check_run_dir(out, to_plain(cfg))
        job, device = validate()
    except SETTING_ERRORS as err:
        _refuse(err, out, names, fresh)
        return None
    except KeyboardInterrupt as stop:
        _interrupted(out, None, fresh, stop)
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
        results = work(job, context)
        results.status, results.identity, results.overrides = "completed", names, task_overrides()
        if main:
            record_run(out, results, context.logger)
            if not cfg.get("keep_checkpoint", False):
                remove_checkpoint(out)  # the prune's
                remove_recovery_checkpoint(out)
        status = "completed"
    except KeyboardInterrupt as stop:
        status = "interrupted"
        _interrupted(out, names if main else None, False, stop)
    except WORK_SETTING_ERRORS as err:  # found while working (a model that does not load, ...)
        log.error("%s", err)
        if main:
            mark(out, "failed", names, str(err))
        if not is_multirun():
            sys.exit(EXIT_SETTING)
        return None
    except Divergence as err:  # a recovery's loss became NaN or infinite: no bug, no setting
        log.error("%s", err)
        if main:
            mark(out, "failed", names, str(err))
        if not is_multirun():
            sys.exit(1)
        return None
    except Exception as err:
        if is_write_failure(err):  # the disk is full, a quota, permissions changed: no bug
            _write_failed(err, out, names if main else None)
            return None
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


def _completed(out: Path) -> RunRecord | None:
    """The record of a completed run in `out` (whose settings `check_run_dir` has matched)."""
    if not (out / CONFIG).is_file():
        return None
    try:
        record = RunRecord.read(out)
    except RecordError:
        return None
    return record if record.completed else None


def show_only(cfg: DictConfig, build: Callable[[], str]) -> str | None:
    """A job that only looks (the prune app's `plan_only`): `build()` checks every setting and
    returns the text to print; nothing is loaded, no run directory is left behind. A bad
    setting: one message, exit 2 (in a multirun, None and the sweep goes on)."""
    quiet_library_bars()
    out = run_dir()
    fresh = not any(out.iterdir())
    try:
        text = build()
    except SETTING_ERRORS as err:
        log.error("%s", err)
        if not is_multirun():
            sys.exit(EXIT_SETTING)
        return None
    finally:
        if fresh and out.exists() and not any(out.iterdir()):
            out.rmdir()
            _remove_empty_parents(out, Path(cfg.paths.output_root) if "paths" in cfg else None)
    sys.stdout.write(text + "\n")
    return text


def _refuse(err: Exception, out: Path, names: RunIdentity, fresh: bool) -> None:
    """A bad setting found before any work: one message; alone, exit 2 and no run directory
    left behind; in a multirun, a failed results.json (unless the directory holds another
    run, which stays untouched) and the sweep goes on."""
    log.error("%s", err)
    if not is_multirun():
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        sys.exit(EXIT_SETTING)
    if isinstance(err, RunDirectoryError | RunDirectoryBusy):  # its directory stays: note beside
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


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, a batch system's time limit, `kill`): handled as Ctrl-C is."""


@contextmanager
def _signals_as_interruptions() -> Iterator[None]:
    """SIGTERM raises `Terminated` while the job runs, so that it is recorded `interrupted`
    and says how to resume, as Ctrl-C does (the previous handler is restored after)."""

    def terminate(signum: int, frame: object) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: leave the signals as they are
        yield
        return
    try:
        yield
    finally:
        if previous is not None:  # None: installed outside Python, cannot be put back
            signal.signal(signal.SIGTERM, previous)


def _interrupted(
    out: Path, names: RunIdentity | None, fresh: bool, stop: KeyboardInterrupt
) -> NoReturn:
    """Ctrl-C or SIGTERM: record `interrupted` and say, in one line, how to resume."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM does not cut the record
    terminated = isinstance(stop, Terminated)
    how = "SIGTERM" if terminated else "Ctrl-C"
    if names is not None:
        mark(out, "interrupted", names, f"interrupted ({how}) before it finished")
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
        log.error("interrupted (%s) before the run started; nothing was written", how)
    else:
        log.error("interrupted (%s); resume with the same command plus %s", how, _resume(out))
    sys.exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)


def _write_failed(err: Exception, out: Path, names: RunIdentity | None) -> None:
    """A write the filesystem refused mid-run: one message naming the file (and the bytes it
    needed), what was kept, and the command that resumes once there is room; exit code 1."""
    if names is not None:
        try:
            mark(out, "failed", names, str(err))
        except OSError:  # the record cannot be written either (the disk is still full)
            pass
    kept = (
        f"the last complete checkpoint in {out / CHECKPOINT_DIR} is kept"
        if (out / CHECKPOINT_DIR / "progress.json").is_file()
        else f"what was finished in {out} is kept"
    )
    log.error(
        "%s; %s; make room (or fix the permissions), then resume with the same command plus %s",
        err,
        kept,
        _resume(out),
    )
    if not is_multirun():
        sys.exit(1)


def _resume(out: Path) -> str:
    """The override that resumes the run in `out` (its sweep, inside a multirun)."""
    if is_multirun():
        return _override("sweep", HydraConfig.get().sweep.dir)
    return _override("run", out)


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
                record = RunRecord.read(results.parent)
            except RecordError as err:
                bad.append(f"{results.parent}: unreadable: {err}")
                continue
            if not record.completed:
                bad.append(f"{results.parent}: {record.status}: {record.error or ''}")
        if bad:
            log.error("%d job(s) of the sweep did not complete:\n%s", len(bad), "\n".join(bad))
            sys.exit(1)


def timed_together(
    record: RunRecord,
    pipe: DiffusionPipeline,
    model: ModelAdapter,
    settings: EvalSettings,
    context: RunContext,
) -> RunRecord:
    """The record with dense and pruned latencies measured back to back in this process
    (`speed`, and both evaluations' seconds per image), where the evaluation times latency and
    the dense model is evaluated: a cached dense latency was timed by another process."""
    if settings.efficiency_repeats == 0 or record.eval is None or record.dense is None:
        return record
    if context.parallel.is_main:
        speed = latency_against_dense(pipe, model, settings.efficiency_repeats)
        record = replace(
            record,
            speed=speed,
            eval=with_latency(record.eval, speed.pruned_seconds_per_image, speed.pruned_seconds),
            dense=with_latency(record.dense, speed.dense_seconds_per_image, speed.dense_seconds),
        )
    context.parallel.barrier()
    return record


def build_logger(
    node: DictConfig, directory: Path, config: dict[str, Any], names: RunIdentity
) -> WandbLogger:
    """A W&B run in `directory`, grouped by sweep id, tagged `key:value` by the run's settings."""
    group = node.group if node.group is not None else sweep_id()
    labels = [f"{k}:{v}" for k, v in names.tags().items() if k in TAG_KEYS]
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


def record_run(out: Path, record: RunRecord, logger: WandbLogger | None) -> None:
    """results.json, the dense-vs-pruned table in the log, and W&B (rank 0)."""
    record.write(out)
    if record.eval is not None or record.dense is not None:
        log.info("%s\n%s", out, summary_table(record))
    if logger is not None:
        log_run(logger, record)


def log_run(logger: WandbLogger, record: RunRecord) -> None:
    """Metrics (prune/, eval/, dense/ namespaces), the fixed-prompt grids and a results row."""
    flat = record.flat_metrics()
    logger.log_metrics(flat)
    logger.set_summary(flat)
    for key, evaluation in (("eval", record.eval), ("dense", record.dense)):
        if evaluation is not None and Path(evaluation.grid).is_file():
            caption = " | ".join(evaluation.grid_prompts)
            logger.log_image_file(f"{key}/grid", Path(evaluation.grid), caption)
    if record.eval is not None and record.eval.comparison:
        caption = "dense | pruned, same prompt and seed"
        logger.log_image_file("eval/comparison", Path(record.eval.comparison), caption)
    columns = [k for k in flat if not k.startswith("dense/")]
    logger.log_table("results", columns, [[flat[k] for k in columns]])


SUMMARY_KEYS = (
    "fid",
    "prompt_fidelity",
    "clip_score",
    "image_reward",
    "psnr",
    "ssim",
    "lpips",
    "latent_rel_error",
    "toy_feature_distance",
    "params",
    "tflops_per_forward",
    "seconds_per_image",
)


def summary_table(record: RunRecord) -> str:
    """A short dense-vs-pruned table of the headline metrics (for the log), the pruned model's
    intervals beside its values (95% over prompts; the seconds per image's over its timed
    repeats); dense-relative metrics have no dense value. The speed-up (timed back to back)
    with its interval, flagged `within noise` where that contains 1."""
    pruned = {} if record.eval is None else evaluation_numbers(record.eval)
    dense = {} if record.dense is None else evaluation_numbers(record.dense)
    keys = [k for k in SUMMARY_KEYS if k in pruned or k in dense]
    names = record.identity
    title = f"{names.method} {names.granularity} {names.sparsity}"
    if names.modulation is not None:
        title += f" + {names.modulation} modulation"
    if names.recover is not None:
        title += f" + {names.recover}"
    if names.quantize is not None:
        title += f" + {names.quantize}"
    lines = [f"{'metric':<20} {'dense':>12} {title:>28}"]
    if record.quantize is not None:  # the denoiser's weights in memory, before and after
        q = record.quantize
        weights = f"{q.weight_bytes_after / 1e6:.4g} MB"
        before = f"{q.memory_ratio:.3f}x of {q.weight_bytes_before / 1e6:.4g} MB unquantized"
        lines.append(f"{'weights in memory':<20} {'':>12} {weights:>28}  ({before})")
    intervals = {} if record.eval is None else dict(record.eval.intervals)
    efficiency = None if record.eval is None else record.eval.efficiency
    latency = None if record.speed is None else record.speed.pruned_seconds_interval
    if latency is None and efficiency is not None:
        latency = efficiency.seconds_per_image_interval
    if latency is not None:
        intervals["seconds_per_image"] = latency
    for key in keys:
        value = _cell(pruned.get(key))
        if key in intervals:
            value += " [{}, {}]".format(*map(_cell, intervals[key]))
        lines.append(f"{key:<20} {_cell(dense.get(key)):>12} {value:>28}")
    if record.speed is not None:
        speed = record.speed
        speedup = f"{speed.speedup:.3f}x"
        if speed.speedup_interval is not None:
            speedup += " [{:.3f}, {:.3f}]".format(*speed.speedup_interval)
        notes = [*speed.flags, f"dense / pruned, {speed.repeats} repeats timed back to back"]
        lines.append(f"{'speed-up':<20} {'':>12} {speedup:>28}  ({'; '.join(notes)})")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
