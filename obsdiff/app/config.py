"""Turning Hydra configs into typed objects, once, in the apps; the configs' defaults from the
dataclasses that hold them.

Each setting and its default is said once, in a dataclass of the layer that uses it (a method's
parameters in its class, the calibration in `CalibrationSettings`, the prune run's top-level
keys in `PruneSettings`, the evaluation in `EvalOptions`, the runner in `RunnerSettings`, the
timestep weighting in `TimestepWeighting`, the quantization in `QuantizeSettings`).
`register_schemas` stores their defaults as Hydra configs under `schema/`, which the YAML
options include (e.g. conf/method/obsdiff.yaml: `defaults: [/schema/method/obsdiff@_here_]`)
and override where they differ;
`python -m obsdiff.prune --cfg job` prints the composed result.

Library code never sees a DictConfig: apps build the objects here (`build`, `settings`) and
pass them down. `build` only builds classes of obsdiff itself, so that a config file cannot
construct arbitrary objects; a wrong key or value is one clear error naming it.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import hydra.utils
from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from obsdiff.calibration.sequential import CalibrationSettings
from obsdiff.eval.options import EvalOptions
from obsdiff.methods import METHODS
from obsdiff.methods.modulation import LowRankModulation
from obsdiff.models.base import DATA_DIR, ModelAdapter, adapter_from_config
from obsdiff.models.loading import ModelConfigError
from obsdiff.oneshot.settings import PruneSettings
from obsdiff.pruning.schedules import TimestepWeighting
from obsdiff.quantization.settings import QuantizeSettings
from obsdiff.recovery.settings import RecoverySettings
from obsdiff.runners.fabric import RunnerSettings
from obsdiff.utils.settings import from_mapping, plain_defaults


CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
ALLOWED_TARGET_PREFIXES = ("obsdiff.",)

T = TypeVar("T")


# `${obsdiff_data:toy/pipeline}`: a file shipped in obsdiff/data, wherever obsdiff is installed.
OmegaConf.register_new_resolver("obsdiff_data", lambda rel: str(DATA_DIR / rel), replace=True)


def run_stamp() -> str:
    """A run directory's name: its start to the millisecond and the process id, so that jobs
    started together never share one (`2026-12-07_11-36-31.861_4242`)."""
    now = datetime.now()
    return f"{now:%Y-%m-%d_%H-%M-%S}.{now.microsecond // 1000:03d}_{os.getpid()}"


# `${obsdiff_run_stamp:}`, cached as Hydra's `now`: every job of a sweep reads the same value.
OmegaConf.register_new_resolver("obsdiff_run_stamp", run_stamp, use_cache=True, replace=True)


class ConfigError(ValueError):
    """A config node cannot be turned into the object it describes."""


def _target_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_schemas() -> None:
    """Every dataclass of settings as a Hydra config under `schema/` (its fields' defaults;
    with `_target_` where the config group builds that class). The prune schema also names the
    default option of the method, granularity and weighting groups (`PruneSettings`)."""
    store = ConfigStore.instance()
    for name, method in METHODS.items():
        node = {"_target_": _target_name(method), **plain_defaults(method)}
        store.store(group="schema/method", name=name, node=node)
    weighting = {"_target_": _target_name(TimestepWeighting), **plain_defaults(TimestepWeighting)}
    store.store(group="schema", name="weighting", node=weighting)
    store.store(group="schema", name="calibration", node=plain_defaults(CalibrationSettings))
    store.store(group="schema", name="runner", node=plain_defaults(RunnerSettings))
    store.store(group="schema", name="eval", node=plain_defaults(EvalOptions))
    store.store(group="schema", name="recover", node=plain_defaults(RecoverySettings))
    store.store(group="schema", name="quantize", node=plain_defaults(QuantizeSettings))
    modulation = {"_target_": _target_name(LowRankModulation), **plain_defaults(LowRankModulation)}
    store.store(group="schema", name="modulation", node=modulation)
    prune = plain_defaults(PruneSettings)
    choices = [{f"/{group}": prune.pop(group)} for group in PruneSettings.GROUPS]
    store.store(group="schema", name="prune", node={"defaults": [*choices, "_self_"], **prune})


register_schemas()


def _target(node: DictConfig, group: str) -> str:
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not isinstance(target, str) or not target.startswith(ALLOWED_TARGET_PREFIXES):
        raise ConfigError(
            f"config group {group!r}: `_target_` must name an obsdiff class "
            f"(prefix {ALLOWED_TARGET_PREFIXES}); got {target!r}"
        )
    return target


def _unset_value(err: OmegaConfBaseException, group: str, target: str) -> ConfigError:
    """A mandatory value left at ??? (or an interpolation that does not resolve)."""
    reason = str(err).splitlines()[0]
    key = getattr(err, "full_key", None) or f"{group}.<key>"
    return ConfigError(
        f"config group {group!r} ({target}): {reason}; set it on the command line: "
        f"{key}=<value> (see conf/{group}/)"
    )


def build(node: DictConfig, expected: type[T], group: str) -> T:
    """The object of a config group option: `build(cfg.method, PruningMethod, "method")`. A
    dataclass target gets every value converted to its field's type (`from_mapping`); another
    target (a factory such as `Granularity.from_name`) is called by Hydra's `instantiate`.

    Raises ConfigError naming the group and the problem when the target is missing or not an
    obsdiff class, a key is unknown or a value invalid, or the result is not an `expected`.
    """
    target = _target(node, group)
    try:
        cls = hydra.utils.get_object(target)
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            values = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
            assert isinstance(values, dict)
            values.pop("_target_")
            obj = from_mapping(cls, {str(k): v for k, v in values.items()}, f"{group}.")
        else:
            obj = hydra.utils.instantiate(node, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ConfigError(f"config group {group!r} ({target}): {cause}") from err
    except OmegaConfBaseException as err:
        raise _unset_value(err, group, target) from None
    except (ValueError, TypeError, ImportError) as err:
        raise ConfigError(f"config group {group!r} ({target}): {err}") from err
    if not isinstance(obj, expected):
        raise ConfigError(
            f"config group {group!r}: {target} built a {type(obj).__name__}, "
            f"expected a {expected.__name__}"
        )
    return obj


def settings(
    node: DictConfig, cls: type[T], prefix: str = "", only: tuple[str, ...] | None = None
) -> T:
    """The settings dataclass `cls` from a config node whose keys sit at `prefix`
    (`"calibration."`; "" at the top level), each value converted to its field's type, or one
    ConfigError naming the key (also for the dataclass's own checks). `only`: the keys read
    from the node (the top level holds the config groups too); by default every key, and one
    `cls` lacks is refused."""
    try:
        data = {str(k): _plain_value(node[k]) for k in node if only is None or k in only}
        return from_mapping(cls, data, prefix)
    except ValueError as err:  # a SettingError, or the dataclass's own check (naming its key)
        raise ConfigError(str(err)) from None
    except OmegaConfBaseException as err:
        reason = str(err).splitlines()[0]
        key = getattr(err, "full_key", None) or f"{prefix}<key>"
        raise ConfigError(f"{reason}; set it on the command line: {key}=<value>") from None


def _plain_value(value: Any) -> Any:
    """A config value resolved into plain data (lists and mappings as Python's)."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True, throw_on_missing=True)
    return value


def instantiate_model(node: DictConfig) -> ModelAdapter:
    """The adapter of the `model` config group, built from its resolved config by
    `adapter_from_config`: the way a saved run finds its model again, without Hydra."""
    target = _target(node, "model")
    try:
        return adapter_from_config(to_plain(node))
    except OmegaConfBaseException as err:
        raise _unset_value(err, "model", target) from None
    except ModelConfigError as err:
        raise ConfigError(f"config group 'model': {err}") from err


def to_plain(node: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers (for result files and loggers)."""
    plain = OmegaConf.to_container(node, resolve=True)
    assert isinstance(plain, dict)
    return {str(k): v for k, v in plain.items()}
