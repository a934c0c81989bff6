"""The report's tables, built as pandas DataFrames: one row per job (`results_frame`, the CSV and
`obsdiff.report.collect`), the paired differences against a reference job
(`differences_frame`), and the Markdown report rendered from them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pandas as pd

from obsdiff.eval.efficiency import format_speedup
from obsdiff.reporting.collect import (
    DENSE,
    EVAL_INFO,
    HIGHER_IS_BETTER,
    INCOMPLETE,
    LABELS,
    OWN_PROCESS_TIMINGS,
    RUN,
    SETTINGS,
    SPEEDUP,
    JobResult,
    groups,
    metric_columns,
    references,
    row_order,
    varying_keys,
)
from obsdiff.reporting.compare import (
    Difference,
    PairedScores,
    cells,
    choose_reference,
    evaluation_key,
    headline,
    tested_best,
)
from obsdiff.utils.progress import progress


PRUNE_COLUMNS = (
    "target_nonzero", "layer_loss", "calibration_seconds", "solve_seconds", "wall_seconds",
    "peak_memory_bytes", "statistics_bytes", "weight_bytes",
)  # fmt: skip


COUNTS = ("target_nonzero", "peak_memory_bytes", "statistics_bytes", "weight_bytes")


def human_count(value: float) -> str:
    """Three significant digits and a suffix: 473k, 2.03B."""
    scaled, suffix = float(value), ""
    for bigger in ("k", "M", "B", "T"):
        if abs(float(f"{scaled:.3g}")) < 1000:
            break
        scaled, suffix = scaled / 1000, bigger
    return f"{float(f'{scaled:.3g}'):g}{suffix}"


def format_value(key: str, value: float | None) -> str:
    if value is None or pd.isna(value):
        return "–"
    if key.startswith("params") or key in COUNTS:
        return human_count(value)
    return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:#.4g}".rstrip(".")


def _md_row(cells: Sequence[Any]) -> str:
    text = ("–" if c is None else str(c).replace("|", "\\|").replace("\n", " ") for c in cells)
    return "| " + " | ".join(text) + " |"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int) -> str:
    align = [":--"] * numeric_from + ["--:"] * (len(header) - numeric_from)
    return "\n".join([_md_row(header), _md_row(align), *map(_md_row, rows)])


def speedup_interval(job: JobResult) -> tuple[float, float] | None:
    """The job's back-to-back speed-up interval, where its record has one."""
    if "speedup_low" not in job.run or "speedup_high" not in job.run:
        return None
    return job.run["speedup_low"], job.run["speedup_high"]


def speedup_within_noise(job: JobResult) -> bool | None:
    """Whether the job's speed-up is not established: its interval contains 1, or it has none
    (None: no speed-up timed)."""
    if SPEEDUP not in job.run:
        return None
    interval = speedup_interval(job)
    return interval is None or interval[0] <= 1.0 <= interval[1]


def speedup_cell(job: JobResult) -> str:
    """`2.013x [1.950, 2.080]`, `1.283x [0.951, 1.612] (75% interval, within noise)`, `–`."""
    if SPEEDUP not in job.run:
        return "–"
    confidence = job.run.get("speedup_confidence")
    return format_speedup(job.run[SPEEDUP], speedup_interval(job), confidence)


def _sparsity_text(job: JobResult) -> str:
    return "?" if job.sparsity is None else f"{job.sparsity:g}"


def _header(metric: str) -> str:
    arrow = {True: " ↑", False: " ↓", None: ""}[HIGHER_IS_BETTER.get(metric)]
    return LABELS.get(metric, metric) + arrow


# ---------------------------------------------------------------------------- frames


def csv_rows(jobs: Sequence[JobResult]) -> list[JobResult]:
    """The dense reference of each model (unless it is a job of the sweep), then every job."""
    ids = {id(j) for j in jobs}
    return [r for r in references(jobs).values() if id(r) not in ids] + list(jobs)


def results_frame(jobs: Sequence[JobResult]) -> pd.DataFrame:
    """One row per job (the dense reference of each model first): status, settings, achieved
    sparsity (and whether it falls short of the target), every metric with its 95% interval
    (`<metric>_low`, `<metric>_high`), evaluation details, the run's figures (the back-to-back
    speed-up with `speedup_low`, `speedup_high`, their coverage `speedup_confidence` and
    `speedup_within_noise`: the interval contains 1, or there is none)."""
    rows = csv_rows(jobs)
    extra = sorted({k for r in rows for k in r.settings if k not in SETTINGS})
    metrics = metric_columns(rows) + sorted(
        {k for r in rows for k in r.metrics} - set(metric_columns(rows))
    )
    info = [k for k in ("eval_set", *EVAL_INFO) if any(r.info.get(k) is not None for r in rows)]
    run = [*RUN[1:], *sorted({k for r in rows for k in r.run} - set(RUN))]
    records = []
    for r in rows:
        record: dict[str, Any] = {"job": r.job, "status": r.status, "error": r.error}
        record.update({k: r.settings.get(k) for k in (*SETTINGS, *extra)})
        record["achieved_sparsity"] = r.run.get("achieved_sparsity")
        record["short_of_target"] = r.shortfall if "achieved_sparsity" in r.run else None
        for metric in metrics:
            record[metric] = r.metrics.get(metric)
            low, high = r.intervals.get(metric, (None, None))
            record[f"{metric}_low"], record[f"{metric}_high"] = low, high
        record.update({k: r.info.get(k) for k in info})
        record.update({k: r.run.get(k) for k in run})
        record["speedup_within_noise"] = speedup_within_noise(r)
        record["images_dir"] = "" if r.images_dir is None else str(r.images_dir)
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    empty = [c for c in frame.columns if c.endswith(("_low", "_high")) and frame[c].isna().all()]
    return frame.drop(columns=empty).convert_dtypes()  # counts stay integers beside gaps


def comparisons(
    jobs: Sequence[JobResult], scores: PairedScores, selector: dict[str, str] | None = None
) -> list[Difference]:
    """Every completed job minus its cell's reference (`choose_reference`), in every metric
    with a known direction, per model and granularity."""
    pairs = []
    for members in groups(jobs).values():
        metric = headline(members)
        for cell in cells(members).values():
            reference = choose_reference(cell, metric, selector)
            if reference is None:
                continue
            names = [m for m in metric_columns(cell) if m in HIGHER_IS_BETTER]
            pairs += [
                (job, reference, name) for job in cell if job is not reference for name in names
            ]
    found = []
    for job, reference, name in progress(pairs, "paired differences", "differences"):
        difference = scores.difference(job, reference, name)
        if difference is not None:
            found.append(difference)
    return found


def differences_frame(differences: Sequence[Difference]) -> pd.DataFrame:
    """One row per (job, metric): the paired difference from the reference and its interval."""
    records = []
    for d in differences:
        low, high = d.interval if d.interval is not None else (None, None)
        records.append(
            {
                "job": d.job.job, "method": d.job.method, "sparsity": d.job.sparsity,
                "reference_job": d.reference.job, "reference_method": d.reference.method,
                "metric": d.metric, "difference": d.mean, "low": low, "high": high,
                "significant": d.significant, "images": d.images,
                **{f"setting:{k}": v for k, v in d.job.settings.items() if k not in SETTINGS},
            }
        )  # fmt: skip
    return pd.DataFrame.from_records(records)


# ---------------------------------------------------------------------------- Markdown


def _value_cell(job: JobResult, metric: str, bold: bool) -> str:
    text = format_value(metric, job.metrics.get(metric))
    if bold:
        text = f"**{text}**"
    if metric in job.intervals:
        low, high = job.intervals[metric]
        text += f" [{format_value(metric, low)}, {format_value(metric, high)}]"
    return text


def _achieved_cell(job: JobResult) -> str:
    achieved = job.run.get("achieved_sparsity")
    if achieved is None:
        return "–"
    return f"{achieved:.3f}" + (" ⚠" if job.shortfall else "")


def dense_rows(jobs: Sequence[JobResult], reference: JobResult | None) -> list[JobResult]:
    """The dense model as evaluated for the jobs: one row per evaluation setting (`eval.*`
    settings that vary, e.g. a robustness sweep's guidance scales), else `reference`."""
    found: dict[tuple[tuple[str, str], ...], JobResult] = {}
    for job in jobs:
        key = evaluation_key(job)
        if job.completed and job.dense is not None and key and key not in found:
            evaluation = {k: v for k, v in job.settings.items() if k.startswith("eval.")}
            found[key] = replace(job.dense, settings={**job.dense.settings, **evaluation})
    if len(found) > 1:
        return list(found.values())
    return [reference] if reference is not None else []


def markdown_table(
    jobs: Sequence[JobResult],
    keys: Sequence[str] = (),
    reference: JobResult | None = None,
    scores: PairedScores | None = None,
) -> str:
    """One Markdown table: the dense reference first (one row per evaluation setting), then the
    completed jobs by method and sparsity; each metric with its 95% interval; in bold the best
    value at each sparsity where its paired difference from the runner-up excludes zero. Prune
    runs without evaluation show what pruning achieved and cost instead."""
    scores = scores or PairedScores()
    rows = sorted(
        (j for j in jobs if j.completed and j.method != DENSE), key=lambda j: row_order(j, keys)
    )
    denses = dense_rows(rows, reference)
    table = denses + rows
    if not table:
        return "_No completed jobs._"
    metrics = metric_columns(table)
    if not metrics:  # prune runs only
        columns = [c for c in PRUNE_COLUMNS if any(c in j.run for j in rows)]
        header = ["method", "sparsity", *keys, "achieved", *(LABELS.get(c, c) for c in columns)]
        body = [
            [j.method, _sparsity_text(j), *(j.settings.get(k) for k in keys), _achieved_cell(j),
             *(format_value(c, j.run.get(c)) for c in columns)]
            for j in rows
        ]  # fmt: skip
        return _md_table(header, body, 2 + len(keys) + 1)
    bold = {
        (id(best), metric)
        for metric in metrics
        if metric in HIGHER_IS_BETTER
        for cell in cells(rows).values()
        for best, difference in [tested_best(cell, metric, scores)]
        if best is not None and difference is not None and difference.significant
    }
    speed = any(SPEEDUP in j.run for j in rows)
    header = ["method", "sparsity", *keys, "achieved", *map(_header, metrics)]
    header += [LABELS[SPEEDUP]] if speed else []
    body = []
    for row in table:
        cells_ = [row.method, _sparsity_text(row), *(row.settings.get(k) for k in keys)]
        cells_.append("–" if row in denses else _achieved_cell(row))
        cells_ += [_value_cell(row, m, (id(row), m) in bold) for m in metrics]
        if speed:
            cells_.append(speedup_cell(row))
        body.append(cells_)
    return _md_table(header, body, 2 + len(keys) + 1)


def differences_table(differences: Sequence[Difference], keys: Sequence[str] = ()) -> str:
    """Paired differences (job minus reference) with their intervals; * where it excludes 0."""
    metrics = list(dict.fromkeys(d.metric for d in differences))
    by_job: dict[int, dict[str, Difference]] = {}
    jobs: dict[int, Difference] = {}
    for d in differences:
        by_job.setdefault(id(d.job), {})[d.metric] = d
        jobs.setdefault(id(d.job), d)
    header = ["method", "sparsity", *keys, "against", *(f"Δ {_header(m)}" for m in metrics)]
    body = []
    for key, first in sorted(jobs.items(), key=lambda item: row_order(item[1].job, keys)):
        job = first.job
        cells_ = [job.method, _sparsity_text(job), *(job.settings.get(k) for k in keys)]
        cells_.append(first.reference.method + "".join(
            f", {k}={first.reference.settings.get(k)}" for k in keys
        ))  # fmt: skip
        for metric in metrics:
            found = by_job[key].get(metric)
            if found is None:
                cells_.append("–")
                continue
            text = f"{found.mean:+#.3g}"
            if found.interval is not None:
                text += f" [{found.interval[0]:+#.3g}, {found.interval[1]:+#.3g}]"
            cells_.append(text + (" *" if found.significant else ""))
        body.append(cells_)
    return _md_table(header, body, 3 + len(keys))


def failed_table(jobs: Sequence[JobResult]) -> str:
    rows = [[j.job, j.model, j.method, _sparsity_text(j), j.error] for j in jobs]
    return _md_table(["job", "model", "method", "sparsity", "error"], rows, 5)


def markdown_report(
    jobs: Sequence[JobResult],
    title: str,
    scores: PairedScores | None = None,
    selector: dict[str, str] | None = None,
) -> str:
    scores = scores or PairedScores()
    keys, refs = varying_keys(jobs), references(jobs)
    failed = [j for j in jobs if not j.completed]
    evaluated = any(j.metrics for j in jobs if j.completed)
    settings = scores.settings
    lines = [f"# {title}", "", f"{len(jobs) - len(failed)} completed jobs and {len(failed)} "]
    lines[-1] += "that did not complete."
    if evaluated:
        lines[-1] += (
            f" Values with their {settings.confidence:.0%} intervals (bootstrap over prompts, "
            f"{settings.resamples} resamples; FID: normal interval from its recomputation on "
            "resampled prompts). In **bold**: the best value at a sparsity where its paired "
            "difference from the runner-up (same prompts and seeds) has an interval that "
            "excludes zero; no bold where it does not, or where the runs kept no per-image "
            "scores. ⚠: achieved sparsity of the target layers more than 0.5 points below the "
            "target."
        )
        if any(k in j.metrics for j in jobs for k in OWN_PROCESS_TIMINGS):
            lines[-1] += (
                " s / image (its interval over the job's timed repeats), s / forward and "
                "generation s were timed by each job in its own process, under its own load: "
                "they do not compare across jobs."
            )
        if any(SPEEDUP in j.run for j in jobs):
            lines[-1] += (
                " The speed-up (dense / pruned) was timed back to back within each job: the "
                "median of its repeats' ratios, with the distribution-free interval of that "
                "median from its order statistics (its coverage said where too few repeats "
                "keep it below 95%); within noise: the interval contains 1, the timings show "
                "no speed-up (nor slow-down)."
            )
    else:
        lines[-1] += " Prune runs without evaluation: what each achieved and cost."
    differences = comparisons(jobs, scores, selector) if evaluated else []
    for (model, granularity), members in groups(jobs).items():
        if not any(j.completed for j in members):
            continue  # listed below, with why
        table = markdown_table(members, keys, refs.get(model), scores)
        lines += ["", f"## {model} · {granularity}", "", table]
        ids = {id(j) for j in members}
        mine = [d for d in differences if id(d.job) in ids]
        if mine:
            against = "the job given by --reference" if selector else (
                "the best other method at each sparsity (by the headline metric), or the best "
                "job where every job is OBS-Diff"
            )  # fmt: skip
            lines += [
                "",
                f"Paired differences (this job minus {against}; same prompts and seeds; "
                f"{settings.confidence:.0%} intervals; *: the interval excludes zero):",
                "",
                differences_table(mine, keys),
            ]
    if failed:
        lines += ["", f"## {INCOMPLETE}", "", failed_table(failed)]
    return "\n".join(lines) + "\n"
