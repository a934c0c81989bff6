"""The report's tables: Markdown (best method per sparsity in bold) and CSV."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from obsdiff.reporting.collect import (
    DENSE,
    EVAL_INFO,
    HIGHER_IS_BETTER,
    INCOMPLETE,
    LABELS,
    RUN,
    SETTINGS,
    JobResult,
    best_per_sparsity,
    groups,
    metric_columns,
    references,
    row_order,
    varying_keys,
)


def human_count(value: float) -> str:
    """Three significant digits and a suffix: 473k, 2.03B."""
    scaled, suffix = float(value), ""
    for bigger in ("k", "M", "B", "T"):
        if abs(float(f"{scaled:.3g}")) < 1000:
            break
        scaled, suffix = scaled / 1000, bigger
    return f"{float(f'{scaled:.3g}'):g}{suffix}"


def format_value(key: str, value: float | None) -> str:
    if value is None:
        return "–"
    if key.startswith("params"):
        return human_count(value)
    return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:#.4g}".rstrip(".")


def _md_row(cells: Sequence[Any]) -> str:
    text = ("–" if c is None else str(c).replace("|", "\\|").replace("\n", " ") for c in cells)
    return "| " + " | ".join(text) + " |"


def _sparsity_text(job: JobResult) -> str:
    return "?" if job.sparsity is None else f"{job.sparsity:g}"


def _header(metric: str) -> str:
    arrow = {True: " ↑", False: " ↓", None: ""}[HIGHER_IS_BETTER.get(metric)]
    return LABELS.get(metric, metric) + arrow


def markdown_table(
    jobs: Sequence[JobResult], keys: Sequence[str] = (), reference: JobResult | None = None
) -> str:
    """One Markdown table: the dense reference first, then the completed jobs by method and
    sparsity; the best value of each metric at each sparsity in bold."""
    rows = sorted(
        (j for j in jobs if j.completed and j.method != DENSE), key=lambda j: row_order(j, keys)
    )
    table = ([reference] if reference is not None else []) + rows
    if not table:
        return "_No completed jobs._"
    metrics = metric_columns(table)
    bests = {m: best_per_sparsity(rows, m) for m in metrics}
    lines = [
        _md_row(["method", "sparsity", *keys, *map(_header, metrics)]),
        _md_row([":--"] * (2 + len(keys)) + ["--:"] * len(metrics)),
    ]
    for row in table:
        cells = [row.method, _sparsity_text(row), *(row.settings.get(k) for k in keys)]
        for metric in metrics:
            value = row.metrics.get(metric)
            text = format_value(metric, value)
            best = row is not reference and value is not None
            best = best and bests[metric].get(row.sparsity) == value
            cells.append(f"**{text}**" if best else text)
        lines.append(_md_row(cells))
    return "\n".join(lines)


def failed_table(jobs: Sequence[JobResult]) -> str:
    lines = [_md_row(["job", "model", "method", "sparsity", "error"]), _md_row([":--"] * 5)]
    for job in jobs:
        lines.append(_md_row([job.job, job.model, job.method, _sparsity_text(job), job.error]))
    return "\n".join(lines)


def markdown_report(jobs: Sequence[JobResult], title: str) -> str:
    keys, refs = varying_keys(jobs), references(jobs)
    failed = [j for j in jobs if not j.completed]
    lines = [
        f"# {title}",
        "",
        f"{len(jobs) - len(failed)} completed jobs and {len(failed)} that did not complete. In "
        "**bold**: the best method at each sparsity (the dense row is the reference).",
    ]
    for (model, granularity), members in groups(jobs).items():
        if not any(j.completed for j in members):
            continue  # listed below, with why
        table = markdown_table(members, keys, refs.get(model))
        lines += ["", f"## {model} · {granularity}", "", table]
    if failed:
        lines += ["", f"## {INCOMPLETE}", "", failed_table(failed)]
    return "\n".join(lines) + "\n"


def csv_rows(jobs: Sequence[JobResult]) -> list[JobResult]:
    """The dense reference of each model (unless it is a job of the sweep), then every job."""
    ids = {id(j) for j in jobs}
    return [r for r in references(jobs).values() if id(r) not in ids] + list(jobs)


def write_csv(jobs: Sequence[JobResult], path: Path) -> None:
    rows = csv_rows(jobs)
    extra = sorted({k for r in rows for k in r.settings if k not in SETTINGS})
    info = [k for k in ("eval_set", *EVAL_INFO) if any(r.info.get(k) is not None for r in rows)]
    run = [*RUN[1:], *sorted({k for r in rows for k in r.run} - set(RUN))]
    columns = [
        "job", "status", "error", *SETTINGS, *extra, "achieved_sparsity",
        *metric_columns(rows), *info, *run, "images_dir",
    ]  # fmt: skip
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, restval="", extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            images = "" if r.images_dir is None else str(r.images_dir)
            fixed = {"job": r.job, "status": r.status, "error": r.error, "images_dir": images}
            writer.writerow({**r.settings, **r.metrics, **r.info, **r.run, **fixed})
