"""Data-parallel calibration: each rank runs its share of the prompts; statistics sums are
all-reduced before solving, so every rank solves on the statistics of the whole set."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DataParallel:
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")

    @classmethod
    def current(cls) -> DataParallel:
        """The initialised torch.distributed group, or a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, count: int) -> range:
        """This rank's contiguous share of `count` items: exact, no duplicates, no padding."""
        return range(
            self.rank * count // self.world_size, (self.rank + 1) * count // self.world_size
        )

    def all_reduce_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Sum every tensor over the ranks, in place."""
        if self.world_size == 1:
            return
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
