"""Shared data for the kernel tests: layers whose inputs have correlated outlier channels."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from kernel_data import outlier_inputs


@pytest.fixture
def layer_data() -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """make(rows, features, tokens, seed) -> (W (rows, features), X (tokens, features), H).

    H = 2 X^T X / tokens."""

    def make(
        rows: int, features: int, tokens: int = 512, seed: int = 0, mean: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        X = outlier_inputs(tokens, features, seed, mean=mean)
        W = torch.randn(
            rows,
            features,
            generator=torch.Generator().manual_seed(seed + 1000),
            dtype=torch.float64,
        )
        return W, X, 2 * X.T @ X / tokens

    return make


@pytest.fixture(scope="session")
def bench_kernels() -> ModuleType:
    """experiments/bench_kernels.py, whose straightforward SparseGPT chain is the test oracle."""
    path = Path(__file__).resolve().parents[2] / "experiments" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
