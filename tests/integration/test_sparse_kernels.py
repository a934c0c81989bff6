"""2:4 sparse kernels: on a CPU, or on a model that is not 2:4, one clear error
before any model is loaded; the pattern check itself. The CUDA conversion and its outputs are
in tests/gpu/test_sparse_kernels_cuda.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from app_runner import run_in_process

import obsdiff
from obsdiff.models.base import ModelAdapter
from obsdiff.models.sparse import SparseKernelError, check_sparse_kernels, is_two_four
from obsdiff.pruning.patterns import NM
from obsdiff.pruning.wanda import wanda_prune


TINY = ["model=tiny_sd3", "calibration=tiny", "model.sampling.num_inference_steps=2"]
TINY += ["calibration.num_prompts=2", "packages=1", "method=magnitude"]


def test_the_two_four_check() -> None:
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    assert not is_two_four(weight)
    pruned, _ = wanda_prune(weight, torch.ones(16), NM(2, 4))
    assert is_two_four(pruned)
    pruned[0, 0] = pruned[0, 1] = pruned[0, 2] = 1.0  # three non-zeros in one group
    assert not is_two_four(pruned)
    assert not is_two_four(torch.zeros(4, 6))  # columns not a multiple of 4


def test_each_missing_piece_is_named() -> None:
    with pytest.raises(SparseKernelError, match="need a 2:4-pruned model; this one is unstr"):
        check_sparse_kernels("unstructured", "cuda", torch.float16)
    with pytest.raises(SparseKernelError, match="run on CUDA only"):
        check_sparse_kernels("semi_2_4", "cpu", torch.float16)


def prune_run(run_dir: Path, granularity: str) -> Path:
    """A magnitude prune of the tiny SD3 (built in code, so that the run names its model)."""
    result = run_in_process(
        "obsdiff.prune", *TINY, f"granularity={granularity}", f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 0, result.stdout[-3000:]
    return run_dir


@pytest.mark.slow
def test_refused_before_the_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    two_four = prune_run(tmp_path / "nm", "semi_2_4")

    def no_loading(self: ModelAdapter) -> None:
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(ModelAdapter, "load", no_loading)
    with pytest.raises(SparseKernelError, match="run on CUDA only"):
        obsdiff.load_pruned(two_four, sparse_kernels=True, device="cpu")

    result = run_in_process(
        "obsdiff.evaluate", f"pruned={two_four}", "sparse_kernels=true", "eval=tiny",
        f"paths.output_root={tmp_path / 'eval'}", "device=cpu",
    )  # fmt: skip
    assert result.returncode == 2
    assert "sparse kernels run on CUDA only" in result.stdout + result.stderr
    assert not list((tmp_path / "eval").glob("evaluate/runs/*/eval"))
