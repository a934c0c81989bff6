"""The sharded solve's seconds: one OBS-Diff package of full-width SD3-Medium blocks (random
weights, statistics from seeded random activations) solved by one process, by two gloo processes
sharing the work units (`obsdiff.calibration.solve`), and by two processes each solving all of
it (the repeated solve before sharding).

    python experiments/bench_sharded_solve.py [--blocks 2] [--repeats 3] [--pattern unstructured]
    python experiments/bench_sharded_solve.py --device cuda --blocks 8   # two GPUs (NCCL)

Each run reports the wall seconds of `solve_package` (the slowest rank, broadcasts included).
The machine's cores are split evenly: one process gets all of them, two processes half each,
so the ratio says what sharding buys at equal hardware. Prints the median and spread per mode,
the ratios to one process, whether the sharded weights equal the unsharded two processes' bit
for bit (same thread count), and the largest weight difference to the one process (run with
twice the threads: the kernels' sums may round otherwise, see obsdiff.calibration.solve).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from obsdiff.api import model_from_config
from obsdiff.calibration.packages import list_units
from obsdiff.calibration.sequential import build_package
from obsdiff.calibration.solve import solve_package
from obsdiff.methods import ObsDiff
from obsdiff.methods.package import Package
from obsdiff.pruning.patterns import NM, Pattern, Unstructured
from obsdiff.runners.parallel import DataParallel


log = logging.getLogger("bench_sharded_solve")

TOKENS = 512  # activation rows fed per update (2 samples x 256 tokens)


def build(blocks: int, device: str = "cpu") -> tuple[torch.nn.Module, Package]:
    """`blocks` full-width SD3-Medium blocks, one package of all their units, statistics fed."""
    from diffusers import SD3Transformer2DModel

    adapter = model_from_config("sd3_medium")
    assert adapter.architecture is not None
    config = json.loads((adapter.architecture / "transformer" / "config.json").read_text())
    torch.manual_seed(0)
    # one block more: the last one is `context_pre_only` (no context FFN), not a typical block
    denoiser = SD3Transformer2DModel.from_config({**config, "num_layers": blocks + 1})
    denoiser.to(device)
    units = list_units(adapter, denoiser, (0, blocks))
    package = build_package(denoiser, units, ObsDiff(), Unstructured(0.5), adapter=adapter)
    for index, group in enumerate(package.groups):
        assert group.stats is not None
        g = torch.Generator().manual_seed(index)
        for step in range(4):
            x = torch.randn(2, TOKENS // 2, group.stats.features, generator=g)
            group.stats.update(x.to(device), 1.0 + 0.25 * step)
    return denoiser, package


def solve(package: Package, pattern: Pattern, parallel: DataParallel, shard: bool) -> float:
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    synchronize()
    started = time.perf_counter()
    solve_package(ObsDiff(), package, pattern, parallel, shard)
    synchronize()
    return time.perf_counter() - started


def _worker(
    rank: int, init: str, blocks: int, pattern: Pattern, shard: bool, out: str, device: str
) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    backend = "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
        device, backend = f"cuda:{rank}", "nccl"
    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        denoiser, package = build(blocks, device)
        dist.barrier()
        seconds = solve(package, pattern, DataParallel(rank, 2), shard)
        if rank == 0:
            state = {k: v.cpu().contiguous() for k, v in denoiser.state_dict().items()}
            safetensors.torch.save_file(state, f"{out}/weights.safetensors")
        Path(f"{out}/seconds{rank}.txt").write_text(str(seconds))
    finally:
        dist.destroy_process_group()


def two_processes(blocks: int, pattern: Pattern, shard: bool, device: str) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as scratch:
        arguments = (f"{scratch}/init", blocks, pattern, shard, scratch, device)
        mp.spawn(_worker, args=arguments, nprocs=2)
        seconds = max(float(Path(f"{scratch}/seconds{r}.txt").read_text()) for r in (0, 1))
        return seconds, safetensors.torch.load_file(f"{scratch}/weights.safetensors")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pattern", choices=["unstructured", "2:4"], default="unstructured")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    pattern: Pattern = NM(2, 4) if args.pattern == "2:4" else Unstructured(0.5)
    cores = os.cpu_count() or 2

    times: dict[str, list[float]] = {"1 process": [], "2 sharded": [], "2 unsharded": []}
    identical, largest, groups = True, 0.0, 0
    for repeat in range(args.repeats):
        torch.set_num_threads(cores)
        denoiser, package = build(args.blocks, "cuda:0" if args.device == "cuda" else "cpu")
        times["1 process"].append(solve(package, pattern, DataParallel(), True))
        single = {k: v.cpu() for k, v in denoiser.state_dict().items()}
        groups = len(package.groups)
        del denoiser, package
        weights = {}
        for mode, shard in (("2 sharded", True), ("2 unsharded", False)):
            seconds, weights[mode] = two_processes(args.blocks, pattern, shard, args.device)
            times[mode].append(seconds)
        sharded, unsharded = weights["2 sharded"], weights["2 unsharded"]
        identical &= all(torch.equal(sharded[k], unsharded[k]) for k in unsharded)
        largest = max(largest, *((sharded[k] - single[k]).abs().max().item() for k in single))
        log.info("repeat %d: %s", repeat + 1, {k: round(v[-1], 2) for k, v in times.items()})

    print(
        f"\nsolve of {args.blocks} full-width SD3-Medium block(s), OBS-Diff {args.pattern}, "
        f"{groups} input groups, {args.device} ({cores} CPU cores); {args.repeats} repeats"
    )
    base = statistics.median(times["1 process"])
    for mode, values in times.items():
        median = statistics.median(values)
        line = f"  {mode:<12} median {median:7.2f} s  [{min(values):.2f}, {max(values):.2f}]"
        line += f"  ratio to 1 process {median / base:5.2f}"
        print(line)
    print(f"  sharded weights equal the unsharded two processes' bit for bit: {identical}")
    print(f"  largest |weight difference| to the one process ({cores} threads): {largest:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
