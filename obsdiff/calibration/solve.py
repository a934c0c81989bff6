"""The package driver: a calibrated package pruned work unit by work unit, in one process or
shared between data-parallel ranks.

A package is cut into work units solved independently of each other (`work_units`): its blocks
for structured pruning (each cut by `obsdiff.methods.structured.prune_structured` from the
method's choice of heads and neurons), else the method's `solve_units` of its input groups
(each pruned by the method's `prune_groups`). A unit's statistics are moved to its linears'
device just before its solve (offloaded statistics: one unit on the device at a time).

Shared between ranks (`shard=True` with several ranks): every rank holds the same all-reduced
statistics and the same weights; the units are dealt by their cost (about n^3 + rows n^2 per
input group, the costliest first to the least loaded rank), each rank solves its own, then every
unit's pruned weights are broadcast from the rank that solved it (structured: its new shapes
first, then every tensor of the block), so every rank goes on with identical weights. A unit
meets exactly the arithmetic it meets in one process (the same batches, on the same
statistics), so the weights equal those of an unsharded solve bit for bit, given equal kernels
on every rank (same device type and thread count).
"""

from __future__ import annotations

import logging
import time

from obsdiff.methods.base import PruningMethod
from obsdiff.methods.package import Depth, Package, PruneRecord, Structured, Target
from obsdiff.methods.structured import prune_structured
from obsdiff.models.surgery import restore_shapes, shapes
from obsdiff.runners.parallel import DataParallel
from obsdiff.utils.progress import progress


log = logging.getLogger(__name__)


def work_units(method: PruningMethod, package: Package, target: Target) -> list[Package]:
    """The parts of `package` pruned independently of each other, in order: its blocks
    (structured) or the method's `solve_units` of its input groups."""
    if isinstance(target, Structured):
        return [package.block_part(block) for block in package.blocks]
    units = method.solve_units([group.shape for group in package.groups])
    return [Package([package.groups[i] for i in unit]) for unit in units]


def prune_unit(method: PruningMethod, unit: Package, target: Target) -> list[PruneRecord]:
    """Prune one work unit in place, its statistics moved to its linears' device."""
    unit = unit.local()
    if isinstance(target, Structured):
        return list(prune_structured(method, unit, target.sparsity, target.align))
    if isinstance(target, Depth):  # whole blocks go in obsdiff.calibration.depth, not here
        raise TypeError("depth pruning has no packages to solve")
    return list(method.prune_groups(unit.groups, target))


def package_order(package: Package, records: list[PruneRecord]) -> list[PruneRecord]:
    """Layer records in the order of the package's linears (work units may batch them in
    another); structured records keep their block order."""
    position = {name: i for i, name in enumerate(n for g in package.groups for n in g.names)}
    return sorted(records, key=lambda r: position.get(getattr(r, "name", ""), 0))


def assign_units(costs: list[float], world_size: int) -> list[int]:
    """The rank that solves each unit: the costliest first, each to the least loaded rank (ties
    to the lower rank): deterministic, so every rank computes the same deal."""
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


def solve_package(
    method: PruningMethod,
    package: Package,
    target: Target,
    parallel: DataParallel | None = None,
    shard: bool = True,
) -> list[PruneRecord]:
    """Prune `package` in place towards `target`, work unit by work unit (on every rank; with
    several ranks and `shard`, each solves its share and receives the others'); one record per
    linear (patterns) or per head and neuron group (structured), in the package's order."""
    parallel = parallel or DataParallel()
    units = work_units(method, package, target)
    records: list[PruneRecord] = []
    if parallel.world_size == 1 or not shard:
        for unit in progress(units, "solve", "work unit", leave=False):
            records += prune_unit(method, unit, target)
        return package_order(package, records)
    costs = [unit.cost() for unit in units]
    owners = assign_units(costs, parallel.world_size)
    started = time.perf_counter()
    solved: dict[int, list[PruneRecord]] = {}
    mine = [i for i, owner in enumerate(owners) if owner == parallel.rank]
    for index in progress(mine, f"solve (rank {parallel.rank})", "work unit", leave=False):
        solved[index] = prune_unit(method, units[index], target)
    seconds = time.perf_counter() - started
    by_rank = parallel.all_gather_object((solved, seconds))
    total = max(sum(costs), 1e-30)
    for rank, (theirs, their_seconds) in enumerate(by_rank):  # rank 0 tells every rank's share
        log.info(
            "solve shared: rank %d solved %d of %d work units, %.1f%% of the package's cost, "
            "in %.2f s",
            rank,
            len(theirs),
            len(units),
            100 * sum(costs[i] for i in theirs) / total,
            their_seconds,
        )
    for index, (unit, owner) in enumerate(zip(units, owners, strict=True)):
        _receive(unit, owner, parallel, isinstance(target, Structured))
        records += by_rank[owner][0][index]
    return package_order(package, records)


def _receive(unit: Package, owner: int, parallel: DataParallel, structured: bool) -> None:
    """Every rank's copy of `unit` made equal to its owner's."""
    if not structured:
        parallel.broadcast_((m.weight.data for g in unit.groups for m in g.modules), owner)
        return
    (block,) = unit.blocks
    structure = parallel.broadcast_object(
        shapes(block.module) if parallel.rank == owner else None, owner
    )
    if parallel.rank != owner:
        restore_shapes(block.module, structure)
    parallel.broadcast_(block.module.state_dict().values(), owner)
