"""The sharded solve: with two gloo processes each rank solves its share of a
package's work units and receives the others'; every rank ends with the weights (structured: the
shapes too) of one process solving the whole package, bit for bit, on the same statistics.

Both sides run one thread per process (the kernels' thread count is the one thing a process
count could otherwise change); the statistics are fed from seeded activations, identical in
every process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from obsdiff.calibration.packages import list_units
from obsdiff.calibration.sequential import build_package
from obsdiff.calibration.solve import assign_units, solve_package, work_units
from obsdiff.methods import ObsDiff, Wanda
from obsdiff.methods.base import PruningMethod
from obsdiff.methods.package import Package, Structured, Target
from obsdiff.models import SD3Adapter
from obsdiff.pruning.patterns import NM, Unstructured
from obsdiff.runners.parallel import DataParallel


TARGETS: dict[str, Target] = {
    "unstructured": Unstructured(0.5),
    "2:4": NM(2, 4),
    "structured": Structured(0.25),
}


def _method(name: str, batch_gb: float | None) -> PruningMethod:
    return ObsDiff(solve_batch_gb=batch_gb) if name == "obsdiff" else Wanda()


def _package(kind: str, method: PruningMethod) -> tuple[torch.nn.Module, Package]:
    """The tiny SD3's denoiser and one package of all its units, statistics from seeded inputs."""
    adapter = SD3Adapter(name="tiny_sd3", tiny="sd3", dtype="float32")
    denoiser = adapter.denoiser(adapter.load())
    target = TARGETS[kind]
    structured = isinstance(target, Structured)
    units = list_units(adapter, denoiser, None, structured=structured)
    package = build_package(denoiser, units, method, target, adapter=adapter)
    for index, group in enumerate(package.groups):
        assert group.stats is not None
        g = torch.Generator().manual_seed(index)
        for step in range(3):
            x = torch.randn(2, 24, group.stats.features, generator=g) + 0.1 * index
            group.stats.update(x, 1.0 + 0.5 * step)
    return denoiser, package


# one case per path of the shared solve: OBS-Diff's batched units (the default batches, and one
# input group a unit), a method that solves each group alone (Wanda, 2:4), structured blocks
CASES: list[tuple[str, str, float | None]] = [
    ("unstructured", "obsdiff", 1.0),
    ("unstructured", "obsdiff", 1e-6),
    ("2:4", "wanda", None),
    ("structured", "obsdiff", 1.0),
]


def _worker(rank: int, init: str, out: str) -> None:
    """Every case, solved shared between the two ranks of one process group."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        for case, (kind, method_name, batch_gb) in enumerate(CASES):
            method = _method(method_name, batch_gb)
            denoiser, package = _package(kind, method)
            records = solve_package(method, package, TARGETS[kind], DataParallel(rank, 2))
            state = {k: v.contiguous() for k, v in denoiser.state_dict().items()}
            safetensors.torch.save_file(state, f"{out}/case{case}-rank{rank}.safetensors")
            Path(f"{out}/case{case}-rank{rank}.json").write_text(
                json.dumps([r.as_dict() for r in records])
            )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two gloo processes' results of every case (one spawn for all of them)."""
    out = tmp_path_factory.mktemp("shared")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=2)
    return out


@pytest.mark.slow
@pytest.mark.xdist_group("sharded_solve")  # the two processes are spawned once, on one worker
@pytest.mark.parametrize("case", range(len(CASES)), ids=["-".join(map(str, c)) for c in CASES])
def test_two_gloo_processes_solve_as_one(shared: Path, case: int) -> None:
    kind, method_name, batch_gb = CASES[case]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        method = _method(method_name, batch_gb)
        denoiser, package = _package(kind, method)
        units = work_units(method, package, TARGETS[kind])
        records = solve_package(method, package, TARGETS[kind])
    finally:
        torch.set_num_threads(threads)
    single = denoiser.state_dict()
    assert len(units) >= 2  # there was something to share
    for rank in (0, 1):
        found = safetensors.torch.load_file(str(shared / f"case{case}-rank{rank}.safetensors"))
        assert found.keys() == single.keys()
        for name, tensor in single.items():
            assert found[name].shape == tensor.shape, name
            assert torch.equal(found[name], tensor), name
        found_records = json.loads((shared / f"case{case}-rank{rank}.json").read_text())
        assert found_records == [r.as_dict() for r in records]
    if kind != "structured":  # it pruned: the target linears hold zeros now
        assert sum(int((m.weight == 0).sum()) for g in package.groups for m in g.modules) > 0


@pytest.mark.unit
def test_units_are_dealt_by_cost() -> None:
    assert assign_units([5.0, 1.0, 1.0, 1.0, 1.0, 1.0], 2) == [0, 1, 1, 1, 1, 1]
    assert assign_units([1.0] * 5, 2) == [0, 1, 0, 1, 0]
    assert assign_units([3.0, 3.0, 2.0, 2.0, 2.0], 2) == [0, 1, 0, 1, 0]
    assert assign_units([], 3) == []
    # the tiny SD3, one input group a unit: each of two ranks gets about half the work
    method = ObsDiff(solve_batch_gb=1e-6)
    _, package = _package("unstructured", method)
    costs = [u.cost() for u in work_units(method, package, TARGETS["unstructured"])]
    owners = assign_units(costs, 2)
    share = sum(c for c, o in zip(costs, owners, strict=True) if o == 0) / sum(costs)
    assert 0.4 < share < 0.6
