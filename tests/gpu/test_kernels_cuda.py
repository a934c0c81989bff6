"""The pruning kernels on a CUDA device give the CPU's results (run with `make test-gpu`)."""

from __future__ import annotations

import pytest
import torch

from obsdiff.pruning import (
    NM,
    InputStatistics,
    Unstructured,
    dsnot_prune,
    obs_prune,
    obs_prune_heads,
    obs_prune_neurons,
)


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def data(rows: int = 64, features: int = 256) -> tuple[torch.Tensor, InputStatistics]:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(rows, features, generator=g)
    stats = InputStatistics(features)
    for _ in range(3):
        stats.update(torch.randn(2, 64, features, generator=g) + 0.5, 1.1)
    return W, stats


@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4)], ids=str)
def test_obs_on_cuda_matches_cpu(pattern) -> None:  # type: ignore[no-untyped-def]
    W, stats = data()
    H = stats.hessian_matrix()
    cpu = obs_prune(W.double(), H.double(), pattern)
    gpu = obs_prune(W.double().cuda(), H.double().cuda(), pattern)
    assert torch.equal(cpu.mask, gpu.mask.cpu())
    torch.testing.assert_close(cpu.weight, gpu.weight.cpu(), rtol=1e-9, atol=1e-9)


def test_structured_and_dsnot_run_on_cuda() -> None:
    W, stats = data(rows=32, features=128)
    H = stats.hessian_matrix().cuda()
    neurons = obs_prune_neurons(W.cuda(), H, 16)
    assert neurons.weights[0].is_cuda and len(neurons.removed) == 16
    heads = obs_prune_heads([W.cuda(), W.cuda() * 2], [H, H], head_dim=32, count=1)
    assert len(heads.removed) == 1
    pruned, mask = dsnot_prune(W.cuda(), stats, Unstructured(0.5))
    assert pruned.is_cuda and bool((mask.sum(1) == 64).all())
