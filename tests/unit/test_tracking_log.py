"""What a run logs to W&B: namespaced metrics and summary, both grids, one results row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from obsdiff.app.shell import log_run, summary_table
from obsdiff.artifacts.record import PruneResult, RunIdentity, RunRecord
from obsdiff.eval.efficiency import Efficiency
from obsdiff.eval.harness import Evaluation


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

    def evaluation(metrics: dict[str, Any], prompts: list[str], **more: Any) -> Evaluation:
        return Evaluation(
            set="tiny", prompts={}, num_images=2, seed=0, images_dir="", grid=str(grid),
            generation_seconds=1.5, metrics_key="", grid_prompts=prompts, metrics=metrics, **more,
        )  # fmt: skip

    efficiency = Efficiency(100, 0.25, 2.0, 0.5, 4.0, 4, "cpu")
    results = RunRecord(
        "completed",
        RunIdentity(method="obsdiff", sparsity=0.5),
        prune=PruneResult(0.5, 2, 100, 100, 0.25, 0.25, 1.0, 2.0, 3.0, 1024, "cpu"),
        eval=evaluation({"fid": 30.5, "clip_score": 0.31, "fid_mode": "clean"}, ["a", "b"]),
        dense=evaluation({"clip_score": 0.32}, ["a"], efficiency=efficiency),
    )
    spy = SpyLogger()
    log_run(spy, results)  # type: ignore[arg-type]
    prune = {"achieved_sparsity": 0.5, "packages": 2, "params_before": 100, "params_after": 100}
    prune |= {"tflops_before": 0.25, "tflops_after": 0.25, "calibration_seconds": 1.0}
    prune |= {"solve_seconds": 2.0, "wall_seconds": 3.0, "peak_memory_bytes": 1024}
    prune |= {"world_size": 1}
    counts = {"num_images": 2, "seed": 0, "generation_seconds": 1.5}
    assert spy.metrics == {
        **{f"prune/{k}": v for k, v in prune.items()},
        **{f"eval/{k}": v for k, v in counts.items()},
        "eval/fid": 30.5,
        "eval/clip_score": 0.31,
        **{f"dense/{k}": v for k, v in counts.items()},
        "dense/clip_score": 0.32,
        "dense/params": 100,
        "dense/tflops_per_forward": 0.25,
        "dense/seconds_per_image": 2.0,
        "dense/seconds_per_forward": 0.5,
        "dense/forwards_per_image": 4.0,
        "dense/num_inference_steps": 4,
    }
    assert spy.summary == spy.metrics
    assert spy.images["eval/grid"] == (grid, "a | b") and "dense/grid" in spy.images
    columns, rows = spy.tables["results"]
    assert rows == [[spy.metrics[c] for c in columns]] and "eval/fid" in columns
    table = summary_table(results)
    assert "fid" in table and "30.5" in table and "0.32" in table and "obsdiff" in table


class SpyRun:
    def __init__(self) -> None:
        self.summary: dict[str, Any] = {}
        self.exit_code: int | None = None

    def finish(self, exit_code: int = 0) -> None:
        self.exit_code = exit_code


@pytest.mark.parametrize(("status", "code"), [("completed", 0), ("interrupted", 1), ("failed", 1)])
def test_an_unfinished_run_ends_failed_in_wandb(status: str, code: int) -> None:
    """W&B shows an interrupted or failed run as failed (exit code 1), never as finished."""
    from obsdiff.artifacts.tracking import WandbLogger

    logger = WandbLogger.__new__(WandbLogger)
    logger.run = SpyRun()  # type: ignore[assignment]
    logger.finish(status)
    assert logger.run.exit_code == code and logger.run.summary["status"] == status
