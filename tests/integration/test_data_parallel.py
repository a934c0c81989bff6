"""Data-parallel calibration: two CPU processes (gloo, launched by Lightning Fabric) give the
single-process result, sharing each package's solve."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
from app_runner import run_app

from obsdiff.artifacts.record import RunRecord
from obsdiff.runners.parallel import DataParallel


COMMON = [
    "model=tiny_sd3",
    "calibration=tiny",
    "model.sampling.num_inference_steps=2",
    "calibration.num_prompts=4",
    "calibration.batch_size=1",
    "packages=2",
]


@pytest.mark.unit
@pytest.mark.parametrize(("count", "world"), [(100, 3), (4, 2), (5, 4), (2, 2)])
def test_shards_cover_every_prompt_once(count: int, world: int) -> None:
    shards = [DataParallel(rank, world).shard(count) for rank in range(world)]
    assert [i for shard in shards for i in shard] == list(range(count))
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
    with pytest.raises(ValueError):
        DataParallel(2, 2)


def run(tmp_path: Path, *overrides: str) -> tuple[Path, str]:
    result = run_app("obsdiff.prune", *COMMON, *overrides, f"paths.output_root={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = [p.parent for p in tmp_path.glob("prune/runs/*/results.json")]
    return run_dir, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)  # about 23 s here: sized for a loaded machine
def test_two_gloo_processes_equal_one(tmp_path: Path) -> None:
    """Structured: statistics all-reduced, then the same heads, neurons and surgery on every rank
    (the unstructured path shares the reduction; one run keeps the suite fast). The statistics
    are importance-weighted (`method.token_weighting=cfg_response`): each rank computes the
    maps of its own prompts and finds them by their numbers.

    The decisions (which heads and neurons go) must agree exactly. The weights agree to float32
    round-off only: the all-reduce adds two partial sums where one process adds one running sum,
    and the processes run their kernels with other thread counts, so each Hessian entry (a float32
    sum of ~10^3 products here) may differ by a few ulps times the number of terms (~1e-4
    relative), which the OBS compensation carries into the kept weights."""
    overrides = ["granularity=structured", "sparsity=0.25", "method.token_weighting=cfg_response"]
    single, _ = run(tmp_path / "single", *overrides)
    parallel, output = run(tmp_path / "ddp", "runner=ddp_cpu", *overrides)
    pruned = RunRecord.read(parallel).prune
    assert pruned is not None and pruned.world_size == 2
    # the solve is shared (obsdiff.calibration.solve; its bit-identity: test_sharded_solve.py):
    # rank 0 logs each rank's share of every package
    shares = re.findall(r"solve shared: rank (\d) solved \d+ of \d+ work units", output)
    assert shares.count("0") == shares.count("1") == 2  # 2 packages
    decisions = [
        [(r["block"], r["group"], r["removed"]) for r in json.loads(m.read_text())["records"]]
        for m in (single / "manifest.json", parallel / "manifest.json")
    ]
    assert decisions[0] == decisions[1] and decisions[0]
    a = safetensors.torch.load_file(str(single / "denoiser.safetensors"))
    b = safetensors.torch.load_file(str(parallel / "denoiser.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
