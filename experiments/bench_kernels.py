"""Benchmark: OBS-prune the 12 target linears of one SD3-Medium-sized MMDiT block on the CPU.

    python experiments/bench_kernels.py            # hidden 1536, FFN 6144 (the SD3-Medium block)
    python experiments/bench_kernels.py --hidden 256 --ffn 1024 --tokens 2048   # a quick run

Compares obsdiff's solver (shared factorisations for layers reading one input, batched column
loops for equal shapes, one factorisation + triangular inverse per Hessian) with a straightforward
per-layer SparseGPT chain written here as the reference (three factorisations per layer, one
column loop per layer). Weights are random; Hessians come from random activations with outlier
channels. Prints per-layer and total times, GFLOP/s, the FLOP floor at the measured matmul rate,
and how far the two results differ (max relative weight difference, mask agreement).
"""

from __future__ import annotations

import logging

import torch

from obsdiff.pruning.patterns import NM, Pattern, Unstructured


log = logging.getLogger("bench_kernels")


# --------------------------------------------------------------------------- the reference chain
def reference_sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT as published (one layer, three factorisations), with exact per-block counts.

    Returns (pruned weight, mask). Used as the benchmark's reference and as a test oracle.
    """
    W = weight.clone()
    H = hessian.clone()
    rows, n = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if isinstance(pattern, Unstructured):
            k = int(rows * i2 * pattern.sparsity + 1e-6) - int(rows * i1 * pattern.sparsity + 1e-6)
            scores = (W1**2 / d.reshape(1, -1) ** 2).flatten()
            mask1 = torch.zeros(scores.numel(), dtype=torch.bool)
            mask1[torch.sort(scores, stable=True).indices[:k]] = True
            mask1 = mask1.reshape(W1.shape)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w = W1[:, i]
            if isinstance(pattern, NM) and i % pattern.m == 0:
                tmp = W1[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m].reshape(1, -1) ** 2
                idx = torch.sort(tmp, dim=1, stable=True).indices[:, : pattern.n]
                mask1.scatter_(1, i + idx, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, mask
