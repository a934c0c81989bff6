"""Calibrate-once sweeps: the toy sweep of four methods x three sparsities pruned with and without
the statistics cache, for packages=1 and packages=4 (CPU, about 12 minutes here).

    python experiments/bench_cache.py [--out outputs/bench_cache]

Prints, per package count, the total calibration seconds of the 12 jobs (summed from their
results.json) with and without the cache, the calibration passes each needed, and whether the
pruned weights are identical (every job's denoiser compared with and without the cache).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import safetensors.torch
import torch

from obsdiff.artifacts.record import RunRecord


log = logging.getLogger("bench_cache")

SWEEP = ["method=obsdiff,wanda,dsnot,magnitude", "sparsity=0.3,0.5,0.7"]


def sweep(out: Path, packages: int, cache: Path | None) -> Path:
    directory = out / f"packages{packages}-{'cache' if cache else 'fresh'}"
    command = [sys.executable, "-m", "obsdiff.prune", "--multirun", *SWEEP]
    command += [f"packages={packages}", f"hydra.sweep.dir={directory}"]
    command += [f"statistics_cache={cache}" if cache else "statistics_cache=null"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    subprocess.run(command, check=True, env=env)
    return directory


def jobs(directory: Path) -> dict[str, RunRecord]:
    found = {}
    for job in sorted(p for p in directory.iterdir() if (p / "results.json").is_file()):
        record = RunRecord.read(job)
        assert record.identity is not None
        found[f"{record.identity.method} {record.identity.sparsity}"] = record
    return found


def same_weights(a: Path, b: Path) -> bool:
    first = safetensors.torch.load_file(str(a / "denoiser.safetensors"))
    second = safetensors.torch.load_file(str(b / "denoiser.safetensors"))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_cache"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    lines = ["| packages | calibration s, no cache | with the cache | ratio | weights identical |"]
    lines.append("|--:|--:|--:|--:|---|")
    for packages in (1, 4):
        cache = args.out / f"statistics-{packages}"
        fresh, cached = sweep(args.out, packages, None), sweep(args.out, packages, cache)
        a, b = jobs(fresh), jobs(cached)
        seconds = [sum(r.prune.calibration_seconds for r in j.values() if r.prune) for j in (a, b)]
        identical = all(
            same_weights(fresh / job, cached / job)
            for job in sorted(p.name for p in fresh.iterdir() if (p / "results.json").is_file())
        )
        lines.append(
            f"| {packages} | {seconds[0]:.1f} | {seconds[1]:.1f} "
            f"| {seconds[1] / seconds[0]:.2f} | {identical} ({len(a)} jobs) |"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
