"""Loading helpers shared by every family: dtypes, the errors of a bad config or a failed
load, local paths versus hub ids, components saved as absent, eval mode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn


if TYPE_CHECKING:  # diffusers is imported where a pipeline is loaded: the settings stay light
    from diffusers import DiffusionPipeline


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class ModelConfigError(ValueError):
    """A model configuration is invalid; raised before anything is loaded."""


class ModelLoadError(RuntimeError):
    """A pipeline could not be loaded from its hub id or local path."""


def looks_like_local_path(source: str) -> bool:
    """True when `source` is meant as a filesystem path rather than a hub id (`org/name`)."""
    return source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().exists()


def set_eval_mode(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Put every torch component in eval mode (models built from configs start in train mode)."""
    for component in pipe.components.values():
        if isinstance(component, nn.Module):
            component.eval()
    return pipe


def null_components(model_dir: Path) -> dict[str, None]:
    """Components that `model_index.json` records as absent (e.g. SD3 saved without T5).

    diffusers refuses to load such a directory unless those components are passed as None.
    """
    index_file = model_dir / "model_index.json"
    if not index_file.is_file():
        return {}
    index = json.loads(index_file.read_text())
    return {
        name: None
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value[0] is None
    }
