"""What the tests cover, read from obsdiff's registries and never listed by hand: the model
configs (conf/model/), the adapter classes (obsdiff.models.ADAPTERS), the methods
(obsdiff.methods.METHODS), the granularities and weighting schemes (their config groups). A new
family, model config, method or option is picked up by every test that reads these.

Per-family test facts live in one table, `CALIBRATION_OVERRIDES`; everything else is asked from
the adapter (its CFG mode, its default blocks).
"""

from __future__ import annotations

import importlib
import re
from functools import cache
from typing import Any

import yaml

from obsdiff.app.config import CONF_DIR
from obsdiff.methods import METHODS, Dense
from obsdiff.methods.granularity import GRANULARITY_OPTIONS
from obsdiff.models import ADAPTERS, ModelAdapter
from obsdiff.models.base import DATA_DIR, adapter_from_config


# The one table of per-family facts: the sampling that reaches every calibration path of a tiny
# model (Flux-dev calibrated with true CFG: the conditional and unconditional denoiser calls of a
# step apart, the unconditional second).
CALIBRATION_OVERRIDES: dict[str, dict[str, Any]] = {
    "tiny_flux": {"true_cfg_scale": 3.0, "negative_prompt": ""},
}


# A method's settings that keep its tests fast where its defaults are sized for real models
# (Diff-Pruning walks up to 1000 training levels: a backward each; EcoDiff trains its masks
# through the whole sampler for 4 epochs, up to 4 times while it bisects beta).
METHOD_OVERRIDES: dict[str, dict[str, Any]] = {
    "diff_pruning": {"levels": 4},
    "ecodiff": {"epochs": 1, "accumulate": 1, "bisection_steps": 1, "warmup_steps": 0},
}


def method_overrides(name: str) -> list[str]:
    """`METHOD_OVERRIDES` of method `name` as command-line overrides."""
    return [f"method.{key}={value!r}" for key, value in METHOD_OVERRIDES.get(name, {}).items()]


def calibration_overrides(name: str) -> list[str]:
    """`CALIBRATION_OVERRIDES` of model config `name` as command-line overrides."""
    sampling = CALIBRATION_OVERRIDES.get(name, {})
    return [f"model.sampling.{key}={value!r}" for key, value in sampling.items()]


@cache
def model_configs() -> dict[str, dict[str, Any]]:
    """Every model config by name, as plain data (`${obsdiff_data:...}` resolved)."""
    configs = {}
    for path in sorted((CONF_DIR / "model").glob("*.yaml")):
        text = re.sub(
            r"\$\{obsdiff_data:([^}]*)\}", lambda m: str(DATA_DIR / m.group(1)), path.read_text()
        )
        configs[path.stem] = yaml.safe_load(text)
    return configs


# built in code from a seed; real checkpoints with their architecture shipped; the rest (the
# toy) are pipelines shipped with obsdiff
TINY_MODELS = sorted(name for name, config in model_configs().items() if config.get("tiny"))
REAL_MODELS = sorted(name for name, config in model_configs().items() if config.get("architecture"))
SHIPPED_MODELS = sorted(set(model_configs()) - set(TINY_MODELS) - set(REAL_MODELS))


def tiny_adapter(name: str, **changes: Any) -> ModelAdapter:
    """The adapter of tiny model config `name` (its calibration overrides applied), with
    `changes` to its arguments (`sampling` merged into the config's)."""
    config = dict(model_configs()[name])
    sampling = dict(config.get("sampling") or {})
    sampling.update(CALIBRATION_OVERRIDES.get(name, {}))
    sampling.update(changes.pop("sampling", {}))
    return adapter_from_config({**config, **changes, "sampling": sampling})


def adapter_class(name: str) -> type[ModelAdapter]:
    """The adapter class a model config names (one of `ADAPTERS`)."""
    module, _, class_name = str(model_configs()[name]["_target_"]).rpartition(".")
    cls = getattr(importlib.import_module(module), class_name)
    assert cls in ADAPTERS, f"{name}: {cls} is not in obsdiff.models.ADAPTERS"
    return cls  # type: ignore[no-any-return]


# every adapter class with the tiny models that exercise it
TINY_BY_ADAPTER: dict[type[ModelAdapter], list[str]] = {
    cls: [name for name in TINY_MODELS if adapter_class(name) is cls] for cls in ADAPTERS
}


def one_denoiser(name: str) -> bool:
    """Whether model config `name` has one denoiser (not a pipeline's timestep experts, which
    recovery refuses), from its architecture."""
    from obsdiff.models.experts import Experts

    return not isinstance(adapter_from_config(model_configs()[name]).denoiser_skeleton(), Experts)


PATTERN_GRANULARITIES = sorted(GRANULARITY_OPTIONS["unstructured"] + GRANULARITY_OPTIONS["nm"])
PATTERN_METHODS = sorted(
    name for name, cls in METHODS.items() if {"unstructured", "nm"} <= set(cls.granularities)
)
STRUCTURED_METHODS = sorted(
    name for name, cls in METHODS.items() if "structured" in cls.granularities
)


def prunes(method: str) -> bool:
    """Whether a method removes anything (all but Dense, the reference row)."""
    return METHODS[method] is not Dense


def covering(
    models: list[str], methods: list[str], granularities: list[str]
) -> list[tuple[str, str, str]]:
    """(model, method, granularity) cases in which every model meets every granularity and
    every method meets every granularity, the methods taking turns: each code path of a
    family and of a method once, not their product."""
    cases = [
        (model, methods[(i + j) % len(methods)], granularity)
        for i, model in enumerate(models)
        for j, granularity in enumerate(granularities)
    ]
    met = {(method, granularity) for _, method, granularity in cases}
    missing = {(m, g) for m in methods for g in granularities} - met
    assert not missing, f"add a model or reorder: {sorted(missing)} not covered"
    return cases
