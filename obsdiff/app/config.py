"""Turning Hydra configs into objects, once, in the apps.

Library code never sees a DictConfig: apps call `instantiate` on a config group node and pass the
resulting typed objects down. `instantiate` only builds classes of obsdiff itself, so that a
config file cannot construct arbitrary objects, and it turns a wrong key into one clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import hydra.utils
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from obsdiff.models.base import DATA_DIR, ModelAdapter, adapter_from_config
from obsdiff.models.loading import ModelConfigError


CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
ALLOWED_TARGET_PREFIXES = ("obsdiff.",)

T = TypeVar("T")


# `${obsdiff_data:toy/pipeline}`: a file shipped in obsdiff/data, wherever obsdiff is installed.
OmegaConf.register_new_resolver("obsdiff_data", lambda rel: str(DATA_DIR / rel), replace=True)


class ConfigError(ValueError):
    """A config node cannot be turned into the object it describes."""


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


def instantiate(node: DictConfig, expected: type[T], group: str) -> T:
    """Build the object of a config group option: `instantiate(cfg.method, PruningMethod,
    "method")`.

    Raises ConfigError naming the group and the problem when the target is missing or not an
    obsdiff class, a key is unknown or a value invalid, or the result is not an `expected`.
    """
    target = _target(node, group)
    try:
        obj = hydra.utils.instantiate(node, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ConfigError(f"config group {group!r} ({target}): {cause}") from err
    except OmegaConfBaseException as err:
        raise _unset_value(err, group, target) from None
    if not isinstance(obj, expected):
        raise ConfigError(
            f"config group {group!r}: {target} built a {type(obj).__name__}, "
            f"expected a {expected.__name__}"
        )
    return obj


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
