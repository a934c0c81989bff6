"""The cheap checks before any work: a safetensors file cut short or padded is found from its
header and size alone, and a folder that cannot be written is found before anything is made."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from obsdiff.utils.file_checks import safetensors_problem, unwritable_folder_problem


pytestmark = pytest.mark.unit

UNWRITABLE = Path("/proc/obsdiff-cannot-be-written")  # no one may create files there, not root


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "denoiser.safetensors"
    tensors = {"a.weight": torch.ones(3, 4), "b.bias": torch.zeros(5, dtype=torch.float16)}
    safetensors.torch.save_file(tensors, str(path))
    return path


def test_an_intact_file_passes(weights: Path) -> None:
    assert safetensors_problem(weights) is None


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[:-1], "the file holds"),  # the last byte lost
        (lambda data: data + b"\0", "the file holds"),  # bytes after the last tensor
        (lambda data: data[:20], "its header claims"),  # cut inside the header
        (lambda data: data[:5], "shorter than a safetensors header"),
        (lambda data: b"", "shorter than a safetensors header"),
        (lambda data: data[:8] + b"\xff" * (len(data) - 8), "its header is not JSON"),
    ],
    ids=["truncated", "padded", "cut-in-header", "cut-in-length", "empty", "garbled-header"],
)
def test_a_damaged_file_is_named_without_loading_it(weights: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    weights.write_bytes(damage(weights.read_bytes()))
    problem = safetensors_problem(weights)
    assert problem is not None and message in problem
    with pytest.raises(safetensors.SafetensorError):  # what the check spares: a failed load
        safetensors.torch.load_file(str(weights))


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    assert safetensors_problem(tmp_path / "none.safetensors") == "the file is missing"


def test_a_folder_that_can_be_written_passes_and_nothing_is_left(tmp_path: Path) -> None:
    assert unwritable_folder_problem(tmp_path) is None
    assert unwritable_folder_problem(tmp_path / "new" / "deeper") is None
    assert list(tmp_path.iterdir()) == []  # the probe is gone and nothing was created


def test_a_file_in_the_way_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert (
        unwritable_folder_problem(tmp_path / "file")
        == f"{tmp_path / 'file'} is a file, not a folder"
    )
    problem = unwritable_folder_problem(tmp_path / "file" / "sub")
    assert problem == f"{tmp_path / 'file'} is a file, not a folder"


def test_a_folder_that_refuses_files_is_named() -> None:
    problem = unwritable_folder_problem(UNWRITABLE / "sub")
    assert problem is not None and problem.startswith("/proc cannot be written")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_named(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        problem = unwritable_folder_problem(locked / "out")
        assert problem is not None and problem.startswith(f"{locked} cannot be written")
    finally:
        locked.chmod(0o755)
