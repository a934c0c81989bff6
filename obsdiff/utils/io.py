"""Atomic file writes: a crash or Ctrl-C never leaves half a file behind."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch


def write_text(path: Path, text: str) -> None:
    """Write atomically (a crash never leaves half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """JSON, written atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors file, written atomically, tensors moved to the CPU."""
    tmp = path.with_suffix(".tmp")
    safetensors.torch.save_file(
        {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp)
    )
    os.replace(tmp, path)
