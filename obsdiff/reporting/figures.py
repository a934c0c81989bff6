"""The report's figures: metric-vs-sparsity plots, the back-to-back speed-ups and image grids.

Timings that each job took in its own process (seconds per image, per forward, generation
seconds) are not plotted: jobs run under other loads, so their differences are mostly noise;
the speed-up, dense and pruned timed back to back within one job, is plotted with its interval.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from obsdiff.eval.generation import IMAGES_LIST
from obsdiff.reporting.collect import (
    DENSE,
    HIGHER_IS_BETTER,
    LABELS,
    OWN_PROCESS_TIMINGS,
    SPEEDUP,
    JobResult,
    groups,
    metric_columns,
    references,
    row_order,
    series_label,
    varying_keys,
)
from obsdiff.utils.images import image_id, image_name
from obsdiff.utils.progress import progress


log = logging.getLogger(__name__)

# Image grid geometry in pixels: label margins on the left and on top, square cells, gaps.
# The top margin holds the caption (the prompt, at most CAPTION_LINES lines of LINE pixels)
# and, below it, the column headers.
CELL, GAP, LEFT, LINE, CAPTION_LINES = 128, 4, 120, 12, 2
HEADER_Y = 4 + CAPTION_LINES * LINE + 6
TOP = HEADER_Y + LINE + 6
PLACEHOLDER = (160, 160, 160)


def axis_label(metric: str) -> str:
    higher = HIGHER_IS_BETTER.get(metric)
    label = LABELS.get(metric, metric)
    return label if higher is None else f"{label} ({'higher' if higher else 'lower'} is better)"


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text)


def _point(job: JobResult, metric: str) -> tuple[float, float, float] | None:
    """The job's value of `metric` (a metric, or the speed-up) and its interval (the value
    itself where it has none)."""
    if metric == SPEEDUP:
        if SPEEDUP not in job.run:
            return None
        value = job.run[SPEEDUP]
        return value, job.run.get("speedup_low", value), job.run.get("speedup_high", value)
    if metric not in job.metrics:
        return None
    value = job.metrics[metric]
    low, high = job.intervals.get(metric, (value, value))
    return value, low, high


def _panel(
    ax: Any, metric: str, jobs: Sequence[JobResult], keys: Sequence[str], colours: dict[str, str]
) -> None:
    """One line per method (colours shared by every panel), in row order."""
    lines: dict[str, list[tuple[float, float, float, float]]] = {label: [] for label in colours}
    for job in jobs:
        if not job.completed or job.sparsity is None:
            continue
        point = _point(job, metric)
        if point is not None:
            lines[series_label(job, keys)].append((job.sparsity, *point))
    for label, points in lines.items():
        if points:
            xs, ys, lows, highs = (np.array(c) for c in zip(*sorted(points), strict=True))
            errors = np.stack([ys - lows, highs - ys])  # (2, points): below and above
            ax.errorbar(
                xs, ys, yerr=errors, marker="o", capsize=3, label=label, color=colours[label]
            )


def plot_metrics(jobs: Sequence[JobResult], out_dir: Path) -> list[Path]:
    """`<out_dir>/<metric>.png` for every metric with a value but the timings each job took in
    its own process: metric against sparsity with its 95% intervals, a line per method, the
    dense value dashed; a panel per model and granularity. `<out_dir>/speedup.png` where jobs
    timed dense and pruned back to back: the speed-up with its interval, 1 (dense) dashed."""
    keys, refs, sections = varying_keys(jobs), references(jobs), groups(jobs)
    series = sorted((j for j in jobs if j.method != DENSE), key=lambda j: row_order(j, keys))
    labels = dict.fromkeys(series_label(j, keys) for j in series)  # ordered, unique
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    metrics = [m for m in metric_columns([*jobs, *refs.values()]) if m not in OWN_PROCESS_TIMINGS]
    if any(SPEEDUP in j.run for j in jobs):
        metrics.append(SPEEDUP)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("plots: %d (%s)", len(metrics), ", ".join(metrics))
    written = []
    for metric in progress(metrics, "plots", "plots"):
        fig = _figure(metric, sections, refs, keys, colours)
        path = out_dir / f"{_slug(metric)}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


def _figure(
    metric: str,
    sections: dict[tuple[str, str], list[JobResult]],
    refs: dict[str, JobResult],
    keys: Sequence[str],
    colours: dict[str, str],
) -> Any:
    """One metric's figure: a panel per model and granularity."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * max(len(sections), 1), 3.8), layout="constrained")
    FigureCanvasAgg(fig)  # rendered by Agg, no pyplot state: nothing to close
    axes = fig.subplots(1, max(len(sections), 1), squeeze=False)[0]
    for ax, ((model, granularity), members) in zip(axes, sections.items(), strict=False):
        _panel(ax, metric, members, keys, colours)
        ax.set_xticks(sorted({j.sparsity for j in members if j.sparsity is not None}))
        reference = refs.get(model)
        title = f"{model} · {granularity}"
        if metric == SPEEDUP:
            ax.axhline(1.0, linestyle="--", color="black", label=f"{DENSE} (1x)")
            title += "\ndense / pruned, timed back to back in each job"
        elif reference is not None and metric in reference.metrics:
            ax.axhline(reference.metrics[metric], linestyle="--", color="black", label=DENSE)
        ax.set(title=title, xlabel="sparsity", ylabel=axis_label(metric))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return fig


# ---------------------------------------------------------------------------- image grid


def _image_ids(images_dir: Path | None) -> set[int]:
    if images_dir is None or not images_dir.is_dir():
        return set()
    return {i for i in map(image_id, images_dir.glob("*.png")) if i is not None}


def default_prompt_id(dirs: Sequence[Path | None]) -> int | None:
    """The smallest id with an image in every folder that has images (else in any)."""
    found = [ids for ids in map(_image_ids, dirs) if ids]
    if not found:
        return None
    return min(set.intersection(*found) or set.union(*found))


def prompt_text(dirs: Sequence[Path | None], prompt_id: int) -> str | None:
    """The prompt of image `prompt_id`, from the image list (`images.json`) beside the first
    of `dirs` that has one."""
    for images_dir in dirs:
        listing = None if images_dir is None else images_dir.parent / IMAGES_LIST
        if listing is not None and listing.is_file():
            for entry in json.loads(listing.read_text()).get("images", []):
                if entry.get("id") == prompt_id:
                    return str(entry.get("prompt"))
    return None


def _cell(images_dir: Path | None, prompt_id: int) -> Image.Image:
    path = None if images_dir is None else images_dir / image_name(prompt_id)
    if path is None or not path.is_file():
        return Image.new("RGB", (CELL, CELL), PLACEHOLDER)
    with Image.open(path) as image:
        return ImageOps.pad(image.convert("RGB"), (CELL, CELL), color=(255, 255, 255))


def cell_origin(row: int, col: int) -> tuple[int, int]:
    """Top-left pixel of a grid cell; column 0 is the dense model."""
    return LEFT + col * (CELL + GAP), TOP + row * (CELL + GAP)


def wrap_caption(draw: ImageDraw.ImageDraw, text: str, width: int) -> list[str]:
    """`text` in at most CAPTION_LINES lines of at most `width` pixels, broken between words;
    what does not fit is cut, with "..."."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    kept = lines[: CAPTION_LINES - 1] + [" ".join(lines[CAPTION_LINES - 1 :])]
    return [_fit(draw, line, width) for line in kept if line]


def _fit(draw: ImageDraw.ImageDraw, line: str, width: int) -> str:
    """`line`, or as much of it as fits in `width` pixels with "..." after it."""
    if draw.textlength(line) <= width:
        return line
    while len(line) > 1 and draw.textlength(line + "...") > width:
        line = line[:-1]
    return line.rstrip() + "..."


def comparison_grid(
    jobs: Sequence[JobResult],
    reference: JobResult | None = None,
    prompt_id: int | None = None,
    keys: Sequence[str] = (),
) -> Image.Image | None:
    """Rows: methods; columns: dense, then the sparsities ascending; each cell the image of one
    prompt id (grey where a job failed or lacks it). None when no job has images."""
    jobs = [j for j in jobs if j.method != DENSE]
    done = [j for j in jobs if j.completed]
    dense_dir = None if reference is None else reference.images_dir
    if prompt_id is None:
        prompt_id = default_prompt_id([dense_dir, *(j.images_dir for j in done)])
    if prompt_id is None:
        return None
    labels = sorted(
        {series_label(j, keys, "\n"): j for j in jobs}.items(),
        key=lambda item: row_order(item[1], keys),
    )
    sparsities = sorted({j.sparsity for j in jobs if j.sparsity is not None})
    failed = [j for j in jobs if not j.completed]
    # a completed job wins over a failed one with the same settings, the first over later ones
    cells = {(series_label(j, keys, "\n"), j.sparsity): j for j in [*failed, *done][::-1]}
    width, height = cell_origin(len(labels), 1 + len(sparsities))
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    prompt = prompt_text([dense_dir, *(j.images_dir for j in done)], prompt_id)
    caption = f"prompt {prompt_id}: {prompt}" if prompt else f"prompt {prompt_id}"
    for line, text in enumerate(wrap_caption(draw, caption, width - 8)):
        draw.text((4, 4 + line * LINE), text, fill=(0, 0, 0))
    for col, title in enumerate([DENSE, *(f"sparsity {s:g}" for s in sparsities)]):
        draw.text((cell_origin(0, col)[0] + 2, HEADER_Y), title, fill=(0, 0, 0))
    for row, (label, _) in enumerate(labels):
        draw.multiline_text((4, cell_origin(row, 0)[1] + 4), label, fill=(0, 0, 0))
        canvas.paste(_cell(dense_dir, prompt_id), cell_origin(row, 0))
        for col, sparsity in enumerate(sparsities, start=1):
            job, (x, y) = cells.get((label, sparsity)), cell_origin(row, col)
            images = job.images_dir if job is not None and job.completed else None
            canvas.paste(_cell(images, prompt_id), (x, y))
            if job is not None and not job.completed:
                draw.text((x + 4, y + 4), "failed", fill=(0, 0, 0))
    return canvas


def write_grids(jobs: Sequence[JobResult], out_dir: Path, prompt_id: int | None) -> list[Path]:
    """`grid.png` for one model and granularity, else `grid_<model>_<granularity>.png` each."""
    keys, refs, sections = varying_keys(jobs), references(jobs), groups(jobs)
    written = []
    for (model, granularity), members in sections.items():
        grid = comparison_grid(members, refs.get(model), prompt_id, keys)
        if grid is None:
            log.warning("no images for %s · %s: no comparison grid", model, granularity)
            continue
        name = "grid.png" if len(sections) == 1 else f"grid_{_slug(model)}_{_slug(granularity)}.png"
        grid.save(out_dir / name)
        log.info("wrote %s (%s · %s)", out_dir / name, model, granularity)
        written.append(out_dir / name)
    return written
