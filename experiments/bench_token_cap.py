"""How `calibration.max_tokens` changes what OBS-Diff prunes on the tiny video model.

    python experiments/bench_token_cap.py
    python experiments/bench_token_cap.py --caps 320 160 80 40 20 --frames 17 --size 128

The tiny Wan (4 blocks, random weights) calibrated on the bundled prompts at `--frames` frames
of `--size` x `--size` (17 frames of 128 x 128: 5 latent frames of 8 x 8 tokens, 320 tokens a
call), pruned by OBS-Diff to 50% unstructured once with every token and once per cap. For each
cap, over all target linears: the relative Frobenius error of the capped Hessians against the
full ones (the statistics), the share of pruned positions that differ from the uncapped run's
(the masks), and the relative Frobenius difference of the pruned weights (the result). A
reference row prunes with every token from other calibration noise (`calibration.seed` + 1):
the spread a cap should be compared with. One prompt a calibration call, so that a call is one
video's tokens.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import torch

import obsdiff
from obsdiff.calibration import sequential
from obsdiff.models.wan import WanAdapter
from obsdiff.prompts.files import BUNDLED_PROMPTS


PROMPTS = 8


def pruned_weights(
    frames: int, size: int, cap: int | None, seed: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The target linears' weights after OBS-Diff 50% (by name) and the Hessians they were
    pruned with (by the name of the group's first linear)."""
    adapter = WanAdapter(name="tiny_wan", tiny="t2v", sampling=sampling(frames, size))
    hessians: dict[str, torch.Tensor] = {}
    real = sequential.solve_package

    def keeping(method: Any, package: Any, *args: Any, **kwargs: Any) -> Any:
        for group in package.groups:
            if group.stats is not None:
                hessians[group.names[0]] = group.stats.hessian_matrix().double().clone()
        return real(method, package, *args, **kwargs)

    sequential.solve_package = keeping  # type: ignore[assignment]
    try:
        pruned = obsdiff.prune(
            adapter.load(), "obsdiff", "unstructured", 0.5,
            prompts=BUNDLED_PROMPTS.read_text().splitlines()[:PROMPTS],
            sampling=sampling(frames, size), packages=1, seed=seed, max_tokens=cap, batch_size=1,
        )  # fmt: skip
    finally:
        sequential.solve_package = real  # type: ignore[assignment]
    layers = [r["name"] for r in pruned.manifest["records"] if r["type"] == "layer"]
    weights = {
        name: pruned.denoiser.get_submodule(name).weight.detach().double() for name in layers
    }
    return weights, hessians


def sampling(frames: int, size: int) -> dict[str, Any]:
    return {
        "num_inference_steps": 4, "guidance_scale": 5.0, "negative_prompt": "",
        "num_frames": frames, "height": size, "width": size, "max_sequence_length": 64,
    }  # fmt: skip


def compare(
    reference: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
    other: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
) -> tuple[float, float, float]:
    """(Hessian relative error, share of differing pruned positions, weight relative
    difference), pooled over the linears."""
    (weights, hessians), (other_weights, other_hessians) = reference, other
    h_err = sum(
        float(torch.linalg.matrix_norm(other_hessians[n] - h) ** 2) for n, h in hessians.items()
    )
    h_ref = sum(float(torch.linalg.matrix_norm(h) ** 2) for h in hessians.values())
    differing = sum(int(((w == 0) != (other_weights[n] == 0)).sum()) for n, w in weights.items())
    pruned = sum(int((w == 0).sum()) for w in weights.values())
    w_err = sum(float((other_weights[n] - w).square().sum()) for n, w in weights.items())
    w_ref = sum(float(w.square().sum()) for w in weights.values())
    return (h_err / h_ref) ** 0.5, differing / pruned, (w_err / w_ref) ** 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps", type=int, nargs="+", default=[160, 80, 40, 20, 10])
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    latent_frames = (args.frames - 1) // 4 + 1
    tokens = latent_frames * (args.size // 16) ** 2
    full = pruned_weights(args.frames, args.size, None)
    rows = [
        (
            "every token, calibration seed + 1",
            *compare(full, pruned_weights(args.frames, args.size, None, seed=1)),
        )
    ]
    for cap in args.caps:
        rows.append(
            (
                f"max_tokens={cap} ({cap / tokens:.0%} of a call)",
                *compare(full, pruned_weights(args.frames, args.size, cap)),
            )
        )
    out = [
        f"tiny Wan, {args.frames} frames of {args.size} x {args.size} ({tokens} tokens a call, "
        f"2 calls a step), 4 steps, {PROMPTS} prompts, OBS-Diff 50% unstructured; against every "
        "token at calibration seed 0:",
        "",
        "| calibration | Hessian rel. error | pruned positions that differ "
        "| weights rel. difference |",
        "|---|--:|--:|--:|",
    ]
    out += [f"| {name} | {h:.4f} | {m:.2%} | {w:.4f} |" for name, h, m, w in rows]
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
