"""The command line checked in seconds, before Hydra runs the app and before the heavy libraries
(diffusers, transformers, Lightning, W&B) are imported.

`check_command_line` composes the app's config the way Hydra will (every job of a multirun),
and refuses, with one message and exit code 2:

- an option that does not exist in a config group (`method=nosuch`), naming the group, its
  options and the closest;
- a key the app does not read, typed with `+`, `++` or neither (`sparsty=0.3`), naming the
  closest keys: Hydra would add a `+key` silently and the run would go on without it;
- a value of the wrong type or out of range (`sparsity=half`), through the same settings
  dataclasses the app builds (alone only: in a multirun a bad job is recorded and the sweep
  goes on, as `obsdiff.app.shell` does);
- an output path the filesystem refuses: `hydra.run.dir` (or `hydra.sweep.dir`),
  `paths.output_root` or `paths.dense_cache` that is a file, sits under a file, or cannot be
  written.

Checks that need the model's files come later, in the app, still before any weights load.
Flags that do not run a job (`--help`, `--cfg`, `--info`, another config directory) are left
to Hydra.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from obsdiff.app.config import CONF_DIR, ConfigError, build, settings
from obsdiff.calibration.sequential import CalibrationSettings
from obsdiff.eval.gate import EXAMPLE as GATE_EXAMPLE
from obsdiff.eval.gate import parse_gate
from obsdiff.eval.options import EvalOptions
from obsdiff.methods import METHODS
from obsdiff.methods.base import PruningMethod
from obsdiff.methods.granularity import Granularity
from obsdiff.methods.modulation import LowRankModulation
from obsdiff.oneshot.settings import PruneSettings
from obsdiff.pruning.schedules import TimestepWeighting
from obsdiff.quantization.settings import QuantizeSettings
from obsdiff.recovery.settings import RecoverySettings
from obsdiff.runners.fabric import RunnerSettings
from obsdiff.utils.file_checks import unwritable_folder_problem


log = logging.getLogger(__name__)

EXIT_SETTING = 2
MAX_JOBS_CHECKED = 64  # a larger sweep has its first jobs composed here, the rest by Hydra
# Mappings whose keys are the user's to choose (`+model.load_kwargs.variant=fp16`).
FREE_FORM = ("model.load_kwargs.",)
_ABSENT = object()


class CommandLineError(ValueError):
    """The command line cannot run: one message naming the key or option and the fix."""


def check_command_line(config_name: str, argv: Sequence[str]) -> None:
    """Exit with code 2 and one message when `argv` (the app's arguments, `sys.argv[1:]`)
    cannot run the app of `conf/<config_name>.yaml`; return when it can (or is not a run)."""
    try:
        _check(config_name, list(argv))
    except CommandLineError as err:
        _report(str(err))
        sys.exit(EXIT_SETTING)


def _check(config_name: str, argv: list[str]) -> None:
    args, _ = get_args_parser().parse_known_args(argv)
    if (
        args.help
        or args.hydra_help
        or args.info
        or args.cfg
        or args.shell_completion
        or args.experimental_rerun
        or args.config_path
        or args.config_name
        or args.config_dir
    ):
        return  # not a run of this app's config: Hydra answers these itself
    app = f"python -m obsdiff.{config_name}"
    with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name=config_name):
        loader = GlobalHydra.instance().config_loader()
        parser = OverridesParser.create(config_loader=loader)  # glob() lists a group's options
        for line in args.overrides:
            try:
                parser.parse_override(line)
            except HydraException as err:
                hint = ""
                if line.lstrip("+").startswith("gate=") and any(c in line for c in "<>"):
                    hint = f"; quote the limits for Hydra: {GATE_EXAMPLE}"
                raise CommandLineError(
                    f"{line!r} cannot be read: {_first_line(err)}{hint}"
                ) from None
        parsed = parser.parse_overrides(args.overrides)
        groups = {o.get_key_element().lstrip("+~") for o in parsed}
        groups = {g for g in groups if "." not in g and loader.get_group_options(g)}
        multirun = args.multirun or any(
            o.key_or_group == "hydra.mode" and str(o.value()) == "MULTIRUN" for o in parsed
        )
        bases: dict[tuple[str, ...], DictConfig] = {}  # by the job's group choices
        for overrides in _jobs(parsed) if multirun else [list(args.overrides)]:
            job = parser.parse_overrides(overrides)
            choices = tuple(o.input_line or "" for o in job if _is_choice(o, groups))
            if choices not in bases:  # the config of these options, for the keys they have
                bases[choices] = _compose(config_name, list(choices), None, app)
            for override in job:
                if not _is_choice(override, groups):
                    _check_known_key(override, bases[choices], app)
            cfg = _compose(config_name, overrides, bases[choices], app)
            HydraConfig.instance().set_config(cfg)  # `${hydra:...}` resolves as in the job
            if not multirun:
                check_values(cfg)
            _check_output_paths(cfg, parsed, multirun)


def _is_choice(override: Override, groups: set[str]) -> bool:
    """A config group's option (`method=wanda`, `+experiment=toy`), not a value."""
    return override.get_key_element().lstrip("+~") in groups or override.package is not None


def _jobs(parsed: list[Override]) -> list[list[str]]:
    """The overrides of the jobs of a multirun, as the basic sweeper expands them (the first
    MAX_JOBS_CHECKED: the others are composed by Hydra when their turn comes)."""
    try:
        batches = BasicSweeper.split_arguments(parsed, None)
    except HydraException as err:
        raise CommandLineError(f"the sweep cannot be expanded: {_first_line(err)}") from None
    return list(itertools.islice((job for batch in batches for job in batch), MAX_JOBS_CHECKED))


def _compose(
    config_name: str, overrides: list[str], base: DictConfig | None, app: str
) -> DictConfig:
    """The job's config as Hydra composes it, or the first problem as a CommandLineError
    (`base`: the config whose keys an unknown key is matched against)."""
    try:
        return compose(config_name, overrides=overrides, return_hydra_config=True)
    except MissingConfigException as err:
        raise CommandLineError(_missing_option(err)) from None
    except ConfigCompositionException as err:
        if base is None:
            raise CommandLineError(_first_line(err)) from None
        raise CommandLineError(_composition_problem(err, base, app)) from None
    except (HydraException, OmegaConfBaseException) as err:
        raise CommandLineError(_first_line(err)) from None


def _check_known_key(override: Override, base: DictConfig, app: str) -> None:
    """A value override must name a key the app's config has (Hydra adds `+key` silently)."""
    key = override.key_or_group
    if override.is_delete() or key.startswith(("hydra.", *FREE_FORM)):
        return
    try:
        absent = OmegaConf.select(base, key, default=_ABSENT, throw_on_missing=True) is _ABSENT
    except MissingMandatoryValue:  # a key that must be given (`???`): it exists
        absent = False
    if absent:
        raise CommandLineError(_unknown_key(key, base, app))


def _unknown_key(key: str, base: DictConfig, app: str) -> str:
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(base, parent_key) if parent_key else base
    if parent_key and parent is None and parent_key in base:  # a group set to none
        return (
            f"{key}: {parent_key}=none has no keys; choose an option first "
            f"({parent_key}=<option>, see conf/{parent_key}/)"
        )
    owners = _methods_with_key(name) if parent_key == "method" else []
    if owners:  # a parameter of another method (`method.token_weighting` with method=wanda)
        current = OmegaConf.select(base, "hydra.runtime.choices.method", default=None)
        given = f"method={current}" if current else "this method"
        options = " or ".join(f"method={option}" for option in owners)
        return f"{key}: {given} has no such key, {options} has; use {options} or drop {key}"
    known = [str(k) for k in parent if k != "hydra"] if isinstance(parent, DictConfig) else []
    where = f"'{parent_key}'" if parent_key else f"`{app}`"
    return (
        f"{key}: {where} has no such key{_closest(name, known, parent_key)}; "
        f"`{app} --cfg job` prints every key and its value"
    )


def _methods_with_key(name: str) -> list[str]:
    """The methods (options of the `method` group) that have parameter `name`."""
    return [
        option
        for option, cls in METHODS.items()
        if name in {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    ]


def _closest(name: str, known: Sequence[str], parent: str = "", prefix: str = "") -> str:
    """' (did you mean <parent>.<match> or ...?)', each match after `prefix` too; or ''."""
    matches = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    prefix = f"{parent}.{prefix}" if parent else prefix
    return f" (did you mean {' or '.join(prefix + m for m in matches)}?)" if matches else ""


def _missing_option(err: MissingConfigException) -> str:
    """`method=nosuch`: the group, its options and the closest."""
    missing = err.missing_cfg_file or ""
    group, _, option = missing.rpartition("/")
    options = sorted(str(o) for o in err.options or [])
    if not group or not options:
        return _first_line(err)
    return (
        f"{group}={option}: config group '{group}' has no option '{option}'"
        f"{_closest(option, options, prefix=f'{group}=')}; "
        f"its options: {', '.join(options)}"
    )


def _composition_problem(err: ConfigCompositionException, base: DictConfig, app: str) -> str:
    """Hydra's `Could not override 'key'` (a key not in the config) as the unknown key it is;
    any other composition problem in its first line."""
    cause = err.__cause__
    key = getattr(cause, "full_key", None)
    if key and "not in struct" in str(cause):
        return _unknown_key(str(key), base, app)
    return _first_line(err)


def _first_line(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


# ------------------------------------------------------------------------- the values
def check_values(cfg: DictConfig) -> None:
    """Every group and key the settings dataclasses describe, converted as the apps convert
    them (type, range, unknown keys): raises CommandLineError naming the key."""
    checks: list[tuple[str, Any]] = [
        ("method", lambda: build(cfg.method, PruningMethod, "method")),
        ("granularity", lambda: build(cfg.granularity, Granularity, "granularity")),
        ("weighting", lambda: build(cfg.weighting, TimestepWeighting, "weighting")),
        ("modulation", lambda: build(cfg.modulation, LowRankModulation, "modulation")),
        ("calibration", lambda: settings(cfg.calibration, CalibrationSettings, "calibration.")),
        ("runner", lambda: settings(cfg.runner, RunnerSettings, "runner.")),
        ("eval", lambda: settings(cfg.eval, EvalOptions, "eval.")),
        ("recover", lambda: settings(cfg.recover, RecoverySettings, "recover.")),
        ("quantize", lambda: settings(cfg.quantize, QuantizeSettings, "quantize.")),
        ("gate", lambda: parse_gate(cfg.gate)),
        ("sparsity", lambda: settings(cfg, PruneSettings, only=PruneSettings.values())),
    ]
    for key, check in checks:
        if cfg.get(key) is not None:  # an option of `none` (recover=none) has nothing to check
            try:
                check()
            except (ConfigError, ValueError) as err:
                raise CommandLineError(str(err)) from None


# ------------------------------------------------------------------------- the paths
def _check_output_paths(cfg: DictConfig, parsed: list[Override], multirun: bool) -> None:
    """The directories the app will write: each a directory, or one it can make, writable."""
    given = {o.key_or_group for o in parsed}
    run_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    candidates = [
        ("paths.output_root", "paths.output_root"),
        ("paths.dense_cache", "paths.dense_cache" if "eval" in cfg else None),
        (run_key if run_key in given else "paths.output_root", run_key),
    ]
    for key, where in candidates:
        try:
            value = None if where is None else OmegaConf.select(cfg, where)
        except OmegaConfBaseException:  # resolved by the app, which says what is wrong
            value = None
        if value is not None:
            problem = unwritable_folder_problem(Path(str(value)).expanduser())
            if problem is not None:
                raise CommandLineError(f"{key}={value}: {problem}; give a folder you can write")


@contextmanager
def _console() -> Iterator[logging.Logger]:
    """This module's logger printing as the apps' console does (Hydra has not set it up)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    log.addHandler(handler)
    try:
        yield log
    finally:
        log.removeHandler(handler)


def _report(message: str) -> None:
    with _console() as console:
        console.error("%s", message)
