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

import argparse
import logging
import time
from dataclasses import dataclass

import torch

from obsdiff.pruning.obs import ObsProblem, obs_prune_problems
from obsdiff.pruning.patterns import NM, Pattern, Unstructured, lowest_k_mask


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
        if isinstance(pattern, Unstructured):  # exact count per block, same selection as obsdiff
            k = int(rows * i2 * pattern.sparsity + 1e-6) - int(rows * i1 * pattern.sparsity + 1e-6)
            scores = W1**2 / d.reshape(1, -1) ** 2
            mask1 = lowest_k_mask(scores.reshape(1, -1), k).reshape(W1.shape)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w = W1[:, i]
            if isinstance(pattern, NM) and i % pattern.m == 0:
                tmp = W1[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m].reshape(1, -1) ** 2
                mask1[:, i : i + pattern.m] = lowest_k_mask(tmp, pattern.n)
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


# --------------------------------------------------------------------------- the block
@dataclass
class Layer:
    name: str
    input: str
    weight: torch.Tensor


def sd3_block(hidden: int, ffn: int, seed: int) -> tuple[list[Layer], dict[str, int]]:
    """The 12 target linears of an MMDiT block (weights (out, in)) and their input widths."""
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "image_norm": hidden,
        "context_norm": hidden,
        "attention_image": hidden,
        "attention_context": hidden,
        "ff_in_image": hidden,
        "ff_in_context": hidden,
        "ff_hidden_image": ffn,
        "ff_hidden_context": ffn,
    }
    spec = [
        ("attn.to_q", "image_norm", hidden),
        ("attn.to_k", "image_norm", hidden),
        ("attn.to_v", "image_norm", hidden),
        ("attn.add_q_proj", "context_norm", hidden),
        ("attn.add_k_proj", "context_norm", hidden),
        ("attn.add_v_proj", "context_norm", hidden),
        ("attn.to_out.0", "attention_image", hidden),
        ("attn.to_add_out", "attention_context", hidden),
        ("ff.net.0.proj", "ff_in_image", ffn),
        ("ff_context.net.0.proj", "ff_in_context", ffn),
        ("ff.net.2", "ff_hidden_image", hidden),
        ("ff_context.net.2", "ff_hidden_context", hidden),
    ]
    layers = [
        Layer(name, source, torch.randn(rows, inputs[source], generator=g) / inputs[source] ** 0.5)
        for name, source, rows in spec
    ]
    return layers, inputs


def outlier_hessian(features: int, tokens: int, seed: int) -> torch.Tensor:
    """H = 2 X^T X / tokens for activations with a low-rank shared part and 1% outlier channels."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, features, generator=g)
    X += torch.randn(tokens, 16, generator=g) @ torch.randn(16, features, generator=g) * 0.5
    outliers = torch.randperm(features, generator=g)[: max(1, features // 100)]
    X[:, outliers] *= 10 + 20 * torch.rand(len(outliers), generator=g)
    return 2 * X.T @ X / tokens


def matmul_rate(size: int = 2048) -> float:
    """Measured float32 matmul FLOP/s of this machine."""
    a = torch.randn(size, size)
    a @ a
    start = time.perf_counter()
    for _ in range(3):
        a @ a
    return 3 * 2 * size**3 / (time.perf_counter() - start)


def factorisation_flops(n: int) -> float:
    """Cholesky plus triangular inverse, n^3/3 each: the floor of one H^-1 factor."""
    return 2 * n**3 / 3


def update_flops(rows: int, n: int) -> float:
    """The OBS updates of one layer: rows x n^2 multiply-adds (local plus lazy)."""
    return 2 * rows * n * n / 2


def reference_flops(rows: int, n: int) -> float:
    """The reference chain: cholesky, cholesky_inverse, cholesky (4 n^3 / 3) plus the updates."""
    return 4 * n**3 / 3 + update_flops(rows, n)


def differences(weight: torch.Tensor, mask: torch.Tensor, ref: tuple) -> dict[str, float]:
    """How far a result is from a reference (weight, mask).

    A single flipped mask entry (a near-tie decided differently by float32 round-off) changes
    every later update of its row, so weights are compared on the rows whose masks agree;
    whole-matrix figures are given as well.
    """
    W_ref, mask_ref = ref
    delta = (weight.double() - W_ref.double()).abs()  # (rows, n)
    same_rows = (mask == mask_ref).all(1)  # (rows,)
    scale = float(W_ref.abs().max())
    return {
        "agree": float((mask == mask_ref).double().mean()),
        "same_rows": float(same_rows.double().mean()),
        "max_rel_same_rows": float(delta[same_rows].max()) / scale
        if bool(same_rows.any())
        else 0.0,
        "max_rel": float(delta.max()) / scale,
        "frob_rel": float(delta.norm() / W_ref.double().norm()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--ffn", type=int, default=6144)
    parser.add_argument("--tokens", type=int, default=4096, help="calibration rows per Hessian")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nm", type=str, default=None, help="e.g. 2:4 instead of unstructured")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-float64-check",
        action="store_true",
        help="skip comparing both float32 results with a float64 reference on one layer per shape",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    pattern: Pattern = Unstructured(args.sparsity)
    if args.nm:
        n, m = (int(v) for v in args.nm.split(":"))
        pattern = NM(n, m)

    layers, inputs = sd3_block(args.hidden, args.ffn, args.seed)
    log.info("building %d Hessians from %d tokens each ...", len(inputs), args.tokens)
    hessians = {
        name: outlier_hessian(width, args.tokens, args.seed + i)
        for i, (name, width) in enumerate(inputs.items())
    }
    rate = matmul_rate()
    log.info(
        "block: hidden %d, FFN %d, %s, float32, %d threads; matmul %.0f GFLOP/s\n",
        args.hidden,
        args.ffn,
        pattern,
        torch.get_num_threads(),
        rate / 1e9,
    )

    # the reference: one layer at a time, three factorisations each
    reference, ref_times = {}, {}
    log.info("%-24s %11s %9s %9s", "reference chain", "shape", "seconds", "GFLOP/s")
    for layer in layers:
        start = time.perf_counter()
        reference[layer.name] = reference_sparsegpt(layer.weight, hessians[layer.input], pattern)
        ref_times[layer.name] = time.perf_counter() - start
        rows, n = layer.weight.shape
        gflops = reference_flops(rows, n) / ref_times[layer.name] / 1e9
        log.info("%-24s %11s %9.3f %9.1f", layer.name, f"{rows}x{n}", ref_times[layer.name], gflops)
    ref_total = sum(ref_times.values())

    # obsdiff: one problem per input; problems of equal shape run through one batched loop
    by_input = {name: [x for x in layers if x.input == name] for name in inputs}
    groups: dict[tuple[int, int], list[str]] = {}
    for name, members in by_input.items():
        key = (inputs[name], sum(x.weight.shape[0] for x in members))
        groups.setdefault(key, []).append(name)
    ours, ours_total = {}, 0.0
    log.info("\n%-48s %9s %9s %9s", "obsdiff (batched group)", "seconds", "GFLOP/s", "speed-up")
    for (n, _), names in groups.items():
        problems = [
            ObsProblem(hessians[name], [x.weight for x in by_input[name]]) for name in names
        ]
        start = time.perf_counter()
        results = obs_prune_problems(problems, pattern)
        seconds = time.perf_counter() - start
        ours_total += seconds
        flops = 0.0
        for name, problem_results in zip(names, results, strict=True):
            flops += factorisation_flops(n)
            for layer, result in zip(by_input[name], problem_results, strict=True):
                ours[layer.name] = result
                flops += update_flops(layer.weight.shape[0], n)
        members = [x.name for name in names for x in by_input[name]]
        label = f"{len(names)} x H{n}: " + ",".join(m.split(".")[-1] for m in members)
        ref_seconds = sum(ref_times[m] for m in members)
        log.info(
            "%-48s %9.3f %9.1f %8.2fx",
            label[:48],
            seconds,
            flops / seconds / 1e9,
            ref_seconds / seconds,
        )

    floor = sum(factorisation_flops(h.shape[0]) for h in hessians.values()) + sum(
        update_flops(*x.weight.shape) for x in layers
    )
    diffs = [differences(ours[x.name].weight, ours[x.name].mask, reference[x.name]) for x in layers]
    numel = [x.weight.numel() for x in layers]
    agreement = sum(d["agree"] * k for d, k in zip(diffs, numel, strict=True)) / sum(numel)
    log.info("")
    log.info("reference chain total:     %8.2f s", ref_total)
    log.info("obsdiff total:             %8.2f s", ours_total)
    log.info("speed-up:                  %8.2fx", ref_total / ours_total)
    log.info(
        "FLOP floor at %.0f GFLOP/s: %6.2f s (one factorisation per input + updates)",
        rate / 1e9,
        floor / rate,
    )
    log.info("\nobsdiff vs reference chain (float32 both):")
    log.info("  mask agreement:                       %.4f%%", 100 * agreement)
    log.info(
        "  rows with identical masks:            %.2f%%", 100 * min(d["same_rows"] for d in diffs)
    )
    worst_same = max(d["max_rel_same_rows"] for d in diffs)
    log.info("  max |dW| / max |W| on those rows:     %.2e", worst_same)
    log.info("  max |dW| / max |W| on all rows:       %.2e", max(d["max_rel"] for d in diffs))
    log.info("  ||dW||_F / ||W||_F:                   %.2e", max(d["frob_rel"] for d in diffs))
    if not args.no_float64_check:
        log.info("\nagainst a float64 reference (first layer of each shape):")
        seen = set()
        for x in layers:
            if x.weight.shape in seen:
                continue
            seen.add(x.weight.shape)
            exact = reference_sparsegpt(x.weight.double(), hessians[x.input].double(), pattern)
            ref32 = differences(*reference[x.name], exact)
            ours32 = differences(ours[x.name].weight, ours[x.name].mask, exact)
            log.info(
                "  %-22s reference: agree %.4f%%, Frobenius %.1e | "
                "obsdiff: agree %.4f%%, Frobenius %.1e",
                x.name,
                100 * ref32["agree"],
                ref32["frob_rel"],
                100 * ours32["agree"],
                ours32["frob_rel"],
            )


if __name__ == "__main__":
    main()
