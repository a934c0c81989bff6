"""A pruned run that cannot be loaded is named, with the fix, before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import obsdiff.artifacts.pruned as pruned_module
from obsdiff.artifacts.pruned import PrunedRunError, check_pruned_run, load_pruned


pytestmark = pytest.mark.unit

MANIFEST = {"model_config": {"_target_": "obsdiff.models.SD3Adapter", "name": "tiny_sd3"}}


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A prune's run directory (manifest, weights); building its model fails the test."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps(MANIFEST))
    safetensors.torch.save_file({"w": torch.ones(64, 64)}, str(run / "denoiser.safetensors"))

    def no_model(config: dict[str, object]) -> None:
        raise AssertionError("a model was built for a run that cannot be loaded")

    monkeypatch.setattr(pruned_module, "adapter_from_config", no_model)
    return run


def test_an_intact_run_gives_its_manifest(run_dir: Path) -> None:
    assert check_pruned_run(run_dir) == MANIFEST


def test_truncated_weights_are_named_before_any_model_loads(run_dir: Path) -> None:
    weights = run_dir / "denoiser.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a copy or a write cut short
    message = f"{weights} is damaged .*prune again into a new run directory"
    with pytest.raises(PrunedRunError, match=message):
        check_pruned_run(run_dir)
    with pytest.raises(PrunedRunError, match=message):
        load_pruned(run_dir)


def test_missing_weights_are_named(run_dir: Path) -> None:
    (run_dir / "denoiser.safetensors").unlink()
    with pytest.raises(PrunedRunError, match="holds no denoiser.safetensors.*save=true"):
        load_pruned(run_dir)


def test_a_run_saved_with_save_false_says_so(run_dir: Path) -> None:
    for name in ("manifest.json", "denoiser.safetensors"):
        (run_dir / name).unlink()
    (run_dir / "config.yaml").write_text("save: false\n")
    with pytest.raises(PrunedRunError, match="was run with save=false.*prune again with save=true"):
        check_pruned_run(run_dir)


def test_a_damaged_manifest_is_named(run_dir: Path) -> None:
    (run_dir / "manifest.json").write_text('{"model_config": {"_tar')
    with pytest.raises(PrunedRunError, match="manifest.json cannot be read"):
        load_pruned(run_dir)


def test_a_directory_that_is_not_one_is_named(tmp_path: Path) -> None:
    with pytest.raises(PrunedRunError, match="is not a directory"):
        check_pruned_run(tmp_path / "nowhere")
    with pytest.raises(PrunedRunError, match="not the run directory of a finished prune"):
        check_pruned_run(tmp_path)
