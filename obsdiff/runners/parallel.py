"""Data-parallel calibration: each rank runs its share of the prompts; statistics sums are
all-reduced before solving, so every rank solves on the statistics of the whole set."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DataParallel:
    """The processes of a run: this one's rank among `world_size`. `fsdp`: a recovery shards
    its training state over them (`obsdiff.recovery.sharding`) instead of keeping it whole on
    every rank; everything else works data-parallel either way."""

    rank: int = 0
    world_size: int = 1
    fsdp: bool = False

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
        through_device = dist.get_backend() == dist.Backend.NCCL  # NCCL reduces CUDA tensors
        for tensor in tensors:
            if through_device and tensor.device.type == "cpu":  # offloaded: one at a time
                buffer = tensor.cuda()
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                tensor.copy_(buffer)
            else:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def broadcast_(self, tensors: Iterable[torch.Tensor], src: int) -> None:
        """Every tensor overwritten, in place, by rank `src`'s."""
        if self.world_size == 1:
            return
        for tensor in tensors:
            if tensor.is_contiguous():
                dist.broadcast(tensor, src=src)
            else:
                buffer = tensor.contiguous()
                dist.broadcast(buffer, src=src)
                tensor.copy_(buffer)

    def broadcast_object(self, value: Any, src: int) -> Any:
        """Rank `src`'s `value` on every rank (a small picklable record between our own
        processes)."""
        if self.world_size == 1:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every rank's `value`, by rank."""
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered
