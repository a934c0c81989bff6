"""W&B tracking: the offline code path writes a run directory; disabled writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from obsdiff.artifacts.tracking import WandbLogger, resolve_mode


pytestmark = pytest.mark.integration


def test_mode_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("online") == "disabled"  # the environment wins (tests)
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    with pytest.raises(ValueError, match="tracking.mode="):
        resolve_mode("cloud")


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_logging_offline_and_disabled(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = WandbLogger(
        "obsdiff-tests", tmp_path, mode=mode, tags=["test"], config={"sparsity": 0.5}
    )
    logger.log_metrics({"fid": 12.5, "clip_score": 0.31})
    logger.log_images("grid", [Image.new("RGB", (8, 8), "red")], ["a red square"])
    logger.log_table("results", ["method", "fid"], [["obsdiff", 12.5]])
    logger.finish()
    runs = list(tmp_path.glob("wandb/offline-run-*"))
    if mode == "offline":
        assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    else:
        assert runs == []
