"""The resume checkpoint commits atomically: progress.json names the weights it belongs to, a
write that fails half-way (a full disk) keeps the last commit, and a damaged checkpoint is named
with the fix before the model loads."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import obsdiff.oneshot.checkpoint as checkpoint_module
from obsdiff.calibration.sequential import LoopReport
from obsdiff.oneshot.checkpoint import Checkpointer, check_previous_run
from obsdiff.oneshot.job import JobError


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


def _committed(run_dir: Path, packages: int = 1) -> tuple[nn.Module, Checkpointer]:
    """A checkpoint of `packages` finished packages (weights all 1.0) in `run_dir`."""
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    checkpoint = Checkpointer(run_dir, "key", model, num_packages=3)
    for index in range(packages):
        checkpoint.save(index, LoopReport(packages_done=index + 1))
    return model, checkpoint


def _resumes_after_package_one(run_dir: Path) -> None:
    check_previous_run(run_dir, "key")
    fresh = nn.Sequential(nn.Linear(4, 3))
    assert Checkpointer(run_dir, "key", fresh, num_packages=3).restore().packages_done == 1
    assert torch.equal(fresh[0].weight, torch.ones(3, 4))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_text(p.read_text()[:40]), "progress.json is damaged \\(not a JSON"),
        (lambda p: p.write_text('{"run_key": "key"}'), "missing or wrong: packages_done"),
        (lambda p: p.write_text("[]"), "progress.json is damaged \\(not a JSON object"),
        (
            lambda p: (p.parent / "denoiser-1.safetensors").write_bytes(
                (p.parent / "denoiser-1.safetensors").read_bytes()[:-8]
            ),
            "denoiser-1.safetensors, named by .*progress.json, is damaged",
        ),
        (
            lambda p: (p.parent / "denoiser-1.safetensors").unlink(),
            "denoiser-1.safetensors, named by .*progress.json, is damaged \\(the file is missing",
        ),
    ],
    ids=["cut-short", "missing-fields", "not-an-object", "weights-truncated", "weights-missing"],
)
def test_a_damaged_checkpoint_is_named_with_the_fix_before_the_model_loads(
    tmp_path: Path, damage, message: str
) -> None:  # type: ignore[no-untyped-def]
    _committed(tmp_path)
    damage(tmp_path / "checkpoint" / "progress.json")
    fix = f"delete {tmp_path / 'checkpoint'}/ to start the pruning again, or start a new run"
    with pytest.raises(JobError, match=message) as refused:
        check_previous_run(tmp_path, "key")  # what the prune runs before loading the model
    assert fix in str(refused.value)
    with pytest.raises(JobError, match=message):  # and a resume itself, before any tensor
        Checkpointer(tmp_path, "key", nn.Sequential(nn.Linear(4, 3)), num_packages=3).restore()


def test_a_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    _committed(tmp_path)
    with pytest.raises(JobError, match="holds progress.json of a different run"):
        check_previous_run(tmp_path, "another key")


def _half_then_no_space(path: str) -> None:
    """A writer that gets part of the file out, then finds the disk full."""
    Path(path).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{partial")
    raise OSError(errno.ENOSPC, "No space left on device", path)


def test_a_full_disk_while_writing_the_weights_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, checkpoint = _committed(tmp_path)
    with torch.no_grad():
        model[0].weight.fill_(2.0)  # package 2 pruned; its checkpoint finds the disk full
    monkeypatch.setattr(
        safetensors.torch, "save_file", lambda tensors, path, *a, **k: _half_then_no_space(path)
    )
    with pytest.raises(OSError) as failed:
        checkpoint.save(1, LoopReport(packages_done=2))
    assert failed.value.errno == errno.ENOSPC
    monkeypatch.undo()
    _resumes_after_package_one(tmp_path)


def test_a_full_disk_while_committing_the_progress_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, checkpoint = _committed(tmp_path)
    with torch.no_grad():
        model[0].weight.fill_(2.0)

    def no_space(path: Path, data: object) -> None:
        path.with_name(path.name + ".tmp").write_text('{"run_key": "key", "weig')
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint_module, "write_json", no_space)
    with pytest.raises(OSError):
        checkpoint.save(1, LoopReport(packages_done=2))
    monkeypatch.undo()
    assert (tmp_path / "checkpoint" / "denoiser-1.safetensors").is_file()  # not removed early
    _resumes_after_package_one(tmp_path)
