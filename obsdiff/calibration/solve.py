"""The solve of one calibrated package, shared between data-parallel ranks (issue 14).

Every rank holds the same all-reduced statistics and the same weights. Without sharding each
rank would solve the whole package, the same work `world_size` times. Sharded, the package's
work units (`PruningMethod.work_units`: the method's batches of input groups, or its blocks for
structured pruning) are dealt to the ranks by their cost (about n^3 + rows n^2 per input group,
longest first to the least loaded rank); each rank solves its own, then every unit's pruned
weights are broadcast from the rank that solved it (structured: its new shapes first, then
every tensor of the block), so every rank goes on with identical weights. A unit meets exactly
the arithmetic it meets in one process (the same batches, on the same statistics), so the
weights equal those of an unsharded solve bit for bit, given equal kernels on every rank
(same device type and thread count).
"""

from __future__ import annotations

import logging
import time

from obsdiff.methods.base import PruningMethod, package_order
from obsdiff.methods.package import Package, PruneRecord, Structured, Target
from obsdiff.models.surgery import restore_shapes, shapes
from obsdiff.runners.parallel import DataParallel


log = logging.getLogger(__name__)


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
    parallel: DataParallel,
    shard: bool = True,
) -> list[PruneRecord]:
    """Prune `package` in place on every rank; with several ranks and `shard`, each solves its
    share of the work units and receives the others' results. Records in the package's order."""
    if parallel.world_size == 1 or not shard:
        return method.prune_package(package, target)
    units = method.work_units(package, target)
    costs = [unit.cost() for unit in units]
    owners = assign_units(costs, parallel.world_size)
    started = time.perf_counter()
    solved: dict[int, list[PruneRecord]] = {}
    for index, (unit, owner) in enumerate(zip(units, owners, strict=True)):
        if owner == parallel.rank:
            solved[index] = method.prune_unit(unit.local(), target)
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
    records: list[PruneRecord] = []
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
