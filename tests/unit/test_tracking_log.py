"""What a run logs to W&B: namespaced metrics and summary, both grids, one results row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from obsdiff.app import log_run, summary_table


pytestmark = pytest.mark.unit


class SpyLogger:
    def __init__(self) -> None:
        self.metrics: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self.images: dict[str, tuple[Path, str]] = {}
        self.tables: dict[str, tuple[list[str], list[list[Any]]]] = {}

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        self.metrics.update(metrics)

    def set_summary(self, metrics: dict[str, Any]) -> None:
        self.summary.update(metrics)

    def log_image_file(self, key: str, path: Path, caption: str = "") -> None:
        self.images[key] = (path, caption)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.tables[key] = (list(columns), [list(r) for r in rows])


def test_log_run_namespaces_metrics_and_logs_both_grids(tmp_path: Path) -> None:
    grid = tmp_path / "grid.png"
    Image.new("RGB", (8, 8)).save(grid)
    results = {
        "status": "completed",
        "method": "obsdiff",
        "sparsity": 0.5,
        "achieved_sparsity": 0.5,
        "eval": {"fid": 30.5, "clip_score": 0.31, "grid": str(grid), "grid_prompts": ["a", "b"]},
        "dense": {"clip_score": 0.32, "params": 100, "grid": str(grid), "grid_prompts": ["a"]},
    }
    spy = SpyLogger()
    log_run(spy, results)  # type: ignore[arg-type]
    assert spy.metrics == {
        "prune/sparsity": 0.5,
        "prune/achieved_sparsity": 0.5,
        "eval/fid": 30.5,
        "eval/clip_score": 0.31,
        "dense/clip_score": 0.32,
        "dense/params": 100,
    }
    assert spy.summary == spy.metrics
    assert spy.images["eval/grid"] == (grid, "a | b") and "dense/grid" in spy.images
    columns, rows = spy.tables["results"]
    assert rows == [[spy.metrics[c] for c in columns]] and "eval/fid" in columns
    table = summary_table(results)
    assert "fid" in table and "30.5" in table and "0.32" in table


class SpyRun:
    def __init__(self) -> None:
        self.summary: dict[str, Any] = {}
        self.exit_code: int | None = None

    def finish(self, exit_code: int = 0) -> None:
        self.exit_code = exit_code


@pytest.mark.parametrize(("status", "code"), [("completed", 0), ("interrupted", 1), ("failed", 1)])
def test_an_unfinished_run_ends_failed_in_wandb(status: str, code: int) -> None:
    """W&B shows an interrupted or failed run as failed (exit code 1), never as finished."""
    from obsdiff.eval.tracking import WandbLogger

    logger = WandbLogger.__new__(WandbLogger)
    logger.run = SpyRun()  # type: ignore[assignment]
    logger.finish(status)
    assert logger.run.exit_code == code and logger.run.summary["status"] == status
