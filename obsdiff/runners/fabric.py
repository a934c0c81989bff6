"""Lightning Fabric launcher for the apps: device placement and data-parallel processes.

With more than one device Fabric (re)launches one process per device (Hydra-aware) and sets up
the process group; each process then runs the same job with its `DataParallel` rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from obsdiff.runners.parallel import DataParallel


@dataclass(frozen=True)
class RunnerSettings:
    """How an app's processes run (the `runner` config group).

    Attributes:
        accelerator: auto, cpu or cuda (Lightning Fabric's accelerator).
        devices: Processes, one a device (-1: every visible GPU).
        strategy: `auto` (one process), `ddp` (data parallel: calibration and recovery) or
            `fsdp` (data parallel, a recovery's training state sharded over the devices:
            `obsdiff.recovery.sharding`).
        shard_solve: With several ranks, each solves its share of a package's work units
            (`obsdiff.calibration.solve`); false: every rank solves all of it.
    """

    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    shard_solve: bool = True


def launch(settings: RunnerSettings, device: torch.device) -> tuple[torch.device, DataParallel]:
    """(this process's device, its rank) — a single process on `device` when devices == 1."""
    if settings.devices in (1, "1") and settings.strategy == "auto":
        return device, DataParallel()
    from lightning.fabric import Fabric  # heavy import, only for multi-process runs

    fsdp = settings.strategy == "fsdp"  # the processes as DDP's; the recovery shards itself
    fabric = Fabric(
        accelerator=settings.accelerator,
        devices=settings.devices,
        strategy="ddp" if fsdp else settings.strategy,
    )
    fabric.launch()
    return fabric.device, DataParallel(fabric.global_rank, fabric.world_size, fsdp)
