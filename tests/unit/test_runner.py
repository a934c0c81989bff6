"""The runner's launcher: which processes Lightning Fabric starts, and what each is told."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from obsdiff.runners.fabric import RunnerSettings, launch
from obsdiff.runners.parallel import DataParallel


pytestmark = pytest.mark.unit


class FakeFabric:
    """Records how it was made; launches nothing (rank 1 of 2)."""

    made: list[dict[str, Any]] = []

    def __init__(self, **kwargs: Any) -> None:
        FakeFabric.made.append(kwargs)
        self.device, self.global_rank, self.world_size = torch.device("cpu"), 1, 2

    def launch(self) -> None:
        pass


@pytest.mark.parametrize(("strategy", "fsdp"), [("ddp", False), ("fsdp", True)])
def test_fsdp_launches_as_ddp_and_tells_the_recovery_to_shard(
    strategy: str, fsdp: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning starts the processes of either strategy as DDP's (its own FSDP strategy would
    wrap the model itself); the ranks learn whether the recovery shards."""
    monkeypatch.setattr("lightning.fabric.Fabric", FakeFabric)
    FakeFabric.made.clear()
    settings = RunnerSettings(accelerator="cpu", devices=2, strategy=strategy)
    device, parallel = launch(settings, torch.device("cpu"))
    assert FakeFabric.made == [{"accelerator": "cpu", "devices": 2, "strategy": "ddp"}]
    assert parallel == DataParallel(1, 2, fsdp) and device == torch.device("cpu")
    assert launch(RunnerSettings(), torch.device("cpu"))[1] == DataParallel()  # one process
