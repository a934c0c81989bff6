"""A sweep's report folder: tables, plots, grids and `report.json`."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from obsdiff.reporting.collect import JobResult
from obsdiff.reporting.compare import PairedScores
from obsdiff.reporting.figures import plot_metrics, write_grids
from obsdiff.reporting.tables import (
    comparisons,
    differences_frame,
    markdown_report,
    results_frame,
)
from obsdiff.utils.io import write_text
from obsdiff.utils.progress import heartbeat


log = logging.getLogger(__name__)


def write_report(
    jobs: Sequence[JobResult],
    sweep_dir: Path,
    out_dir: Path,
    prompt_id: int | None = None,
    scores: PairedScores | None = None,
    selector: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write every output into `out_dir`, logging each stage; return what `report.json`
    records."""
    scores = scores or PairedScores()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "results.csv", results_frame(jobs).to_csv(index=False))
    log.info("wrote %s", out_dir / "results.csv")
    log.info("paired differences: reading per-image scores and FID features, resampling")
    differences = differences_frame(comparisons(jobs, scores, selector))
    write_text(out_dir / "differences.csv", differences.to_csv(index=False))
    log.info("wrote %s (%d differences)", out_dir / "differences.csv", len(differences))
    with heartbeat("results.md: tables and the significance of each best value"):
        report = markdown_report(jobs, f"Sweep report: `{sweep_dir}`", scores, selector)
    write_text(out_dir / "results.md", report)
    log.info("wrote %s", out_dir / "results.md")
    files = [out_dir / "results.csv", out_dir / "differences.csv", out_dir / "results.md"]
    files += plot_metrics(jobs, out_dir / "plots")
    log.info("wrote the plots into %s", out_dir / "plots")
    files += write_grids(jobs, out_dir, prompt_id)
    failed = [j.job for j in jobs if not j.completed]
    summary = {
        "sweep_dir": str(sweep_dir),
        "jobs": len(jobs),
        "completed": len(jobs) - len(failed),
        "failed": len(failed),
        "failed_jobs": failed,
        "files": [p.relative_to(out_dir).as_posix() for p in files],
    }
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
