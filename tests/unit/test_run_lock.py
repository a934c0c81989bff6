"""One process at a time in a run directory (obsdiff.artifacts.lock) and writes the filesystem
refuses named with their bytes (obsdiff.utils.io)."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from obsdiff.artifacts.lock import LOCK_FILE, RUN_LOCK_HOLDER, RunDirectoryBusy, RunLock
from obsdiff.utils import io
from obsdiff.utils.io import WriteError, is_write_failure, save_tensors, write_text


pytestmark = pytest.mark.unit


def test_a_held_directory_refuses_a_second_holder_naming_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = RunLock(tmp_path)
    first.acquire()
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"]
    monkeypatch.delenv(RUN_LOCK_HOLDER)  # as another process, which did not inherit it
    with pytest.raises(RunDirectoryBusy, match=f"in use by process {os.getpid()} on "):
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    with RunLock(tmp_path):  # free again
        assert (tmp_path / LOCK_FILE).is_file()
    assert RUN_LOCK_HOLDER not in os.environ


def test_the_holders_children_work_under_its_lock(tmp_path: Path) -> None:
    """Data-parallel ranks re-run the command in the same directory: they inherit the holder."""
    with RunLock(tmp_path):
        assert os.environ[RUN_LOCK_HOLDER].startswith(f"{os.getpid()}:")
        child = RunLock(tmp_path)
        child.acquire()  # not refused
        child.release()  # and lets nothing go that it did not hold
        assert (tmp_path / LOCK_FILE).is_file()


def test_the_lock_of_a_process_that_no_longer_runs_is_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / LOCK_FILE).write_text('{"pid": 999999, "host": "gone", "since": "yesterday"}')
    with caplog.at_level(logging.WARNING), RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "took over the lock of process 999999 on gone" in caplog.text


def test_a_write_that_fails_leaves_the_old_file_and_no_partial_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "weights.safetensors"
    save_tensors(target, {"w": torch.ones(4)})

    def full_disk(tensors: dict[str, torch.Tensor], filename: str) -> None:
        Path(filename).write_bytes(b"half a file")
        raise safetensors.SafetensorError("IoError: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(WriteError) as failure:
        save_tensors(target, {"w": torch.zeros(1000)})
    assert failure.value.needed == 4000 and str(target) in str(failure.value)
    assert "No space left on device" in str(failure.value) and is_write_failure(failure.value)
    assert [f.name for f in tmp_path.iterdir()] == [target.name]  # no temporary file left
    assert torch.equal(safetensors.torch.load_file(str(target))["w"], torch.ones(4))


def test_a_full_disk_names_the_space_left_and_other_errors_pass_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(self: Path, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    monkeypatch.setattr(io, "free_bytes", lambda path: 10)
    with pytest.raises(WriteError, match=r"\(11 bytes\): No space left on device \(10 bytes free"):
        write_text(tmp_path / "a.txt", "x" * 11)

    def bug(tensors: dict[str, torch.Tensor], filename: str) -> None:
        raise safetensors.SafetensorError("some tensors share memory")

    monkeypatch.setattr(safetensors.torch, "save_file", bug)
    with pytest.raises(safetensors.SafetensorError, match="share memory"):  # not the disk's
        save_tensors(tmp_path / "w.safetensors", {"w": torch.ones(2)})
    assert not any(tmp_path.iterdir())


def test_only_the_filesystems_refusals_are_write_failures() -> None:
    assert is_write_failure(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_write_failure(OSError(errno.EROFS, "Read-only file system"))
    assert not is_write_failure(OSError(errno.ENOENT, "No such file or directory"))
    assert not is_write_failure(OSError(errno.EACCES, "Permission denied"))  # maybe a read
    assert not is_write_failure(RuntimeError("a bug"))
