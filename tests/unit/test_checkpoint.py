"""The resume checkpoint commits atomically: progress.json names the weights it belongs to."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from obsdiff.calibration.sequential import LoopReport
from obsdiff.oneshot.checkpoint import Checkpointer


pytestmark = pytest.mark.unit


def test_an_interrupted_save_resumes_from_the_last_committed_package(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    checkpoint = Checkpointer(tmp_path, "key", model, num_packages=3)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    checkpoint.save(0, LoopReport(packages_done=1))
    committed = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.fill_(2.0)  # package 2 pruned, then Ctrl-C while its weights are written:
    (tmp_path / "checkpoint" / "denoiser-2.safetensors").write_bytes(b"half a file")

    fresh = nn.Sequential(nn.Linear(4, 3))
    report = Checkpointer(tmp_path, "key", fresh, num_packages=3).restore()
    assert report.packages_done == 1  # package 2 is done again, on package 1's weights
    assert torch.equal(fresh[0].weight, committed)

    checkpoint.save(1, LoopReport(packages_done=2))  # the next commit cleans up after itself
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "denoiser-2.safetensors",
        "progress.json",
    ]
    again = nn.Sequential(nn.Linear(4, 3))
    assert Checkpointer(tmp_path, "key", again, num_packages=3).restore().packages_done == 2
    assert torch.equal(again[0].weight, torch.full((3, 4), 2.0))
