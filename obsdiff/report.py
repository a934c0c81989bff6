"""`python -m obsdiff.report <sweep dir>`: tables, plots and an image grid from a Hydra sweep.

Reads every job directory of a multirun (`<sweep>/<n>/`; a sweep of sweeps or a single run
directory works too) and its `results.json`, and writes `<sweep>/report/`:
`results.csv` (one row per job plus one dense row per model), `results.md` (a table per model and
granularity, the best method at each sparsity in bold, then the jobs that did not complete),
`plots/<metric>.png` (metric against sparsity, a line per method, dense dashed), `grid.png` (one
prompt's image per method and sparsity) and `report.json`. A job without a readable, completed
`results.json` is listed as one that did not complete, with why, never dropped.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from PIL import Image, ImageDraw, ImageOps


log = logging.getLogger(__name__)

RESULTS = "results.json"
INCOMPLETE = "Jobs that did not complete (failed, interrupted, killed or still running)"
DENSE = "dense"
HIGHER_IS_BETTER = {
    "clip_score": True,
    "image_reward": True,
    "prompt_fidelity": True,
    "fid": False,
    "toy_fid": False,
}
QUALITY = ("fid", "clip_score", "image_reward", "prompt_fidelity", "toy_fid")
EFFICIENCY = (
    "params", "tflops_per_forward", "seconds_per_image", "seconds_per_forward",
    "generation_seconds",
)  # fmt: skip
BREAKDOWNS = ("prompt_fidelity_",)  # per-attribute parts of a metric: CSV only
EVAL_INFO = ("num_images", "seed", "num_inference_steps", "forwards_per_image")  # not metrics
SETTINGS = ("model", "method", "granularity", "sparsity", "weighting", "packages")
RUN = (
    "achieved_sparsity", "params_before", "params_after", "tflops_before", "tflops_after",
    "calibration_seconds", "solve_seconds", "wall_seconds", "peak_memory_bytes",
)  # fmt: skip
LABELS = {
    "fid": "FID",
    "clip_score": "CLIP score",
    "image_reward": "ImageReward",
    "prompt_fidelity": "prompt fidelity",
    "toy_fid": "toy FID",
    "params": "params",
    "tflops_per_forward": "TFLOPs / forward",
    "seconds_per_image": "s / image",
    "seconds_per_forward": "s / forward",
    "generation_seconds": "generation s",
}
# Image grid geometry in pixels: label margins on the left and on top, square cells, gaps.
CELL, GAP, LEFT, TOP = 128, 4, 120, 20
PLACEHOLDER = (160, 160, 160)


@dataclass
class JobResult:
    """One job of the sweep (or the dense reference measured by one)."""

    job: str  # the job directory relative to the sweep directory
    path: Path
    status: str  # "completed" or "failed"
    error: str = ""
    settings: dict[str, Any] = field(default_factory=dict)  # SETTINGS, then other overrides
    metrics: dict[str, float] = field(default_factory=dict)  # numeric keys of "eval"
    run: dict[str, float] = field(default_factory=dict)  # sizes, TFLOPs, timings
    info: dict[str, Any] = field(default_factory=dict)  # eval set, number of images
    images_dir: Path | None = None
    dense: JobResult | None = None  # the dense model as evaluated by this job

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def method(self) -> str:
        return str(self.settings.get("method") or "?")

    @property
    def model(self) -> str:
        return str(self.settings.get("model") or "?")

    @property
    def sparsity(self) -> float | None:
        value = self.settings.get("sparsity")
        return float(value) if isinstance(value, int | float) else None


# ---------------------------------------------------------------------------- reading the sweep


def _natural(path: Path) -> list[tuple[int, int, str]]:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts]


def _subdirs(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]


def find_job_dirs(root: Path) -> list[Path]:
    """`root` itself if it is a run directory, else its job directories, one or two levels down."""
    if _is_job(root):
        return [root]
    found = []
    for child in _subdirs(root):
        if _is_job(child):
            found.append(child)
        else:
            found.extend(p for p in _subdirs(child) if _is_job(p))
    return sorted(found, key=lambda p: _natural(p.relative_to(root)))


def _is_job(path: Path) -> bool:
    """A run directory: Hydra's records or a results.json (a job refused before it started has
    only the latter), or any job folder of a multirun (one killed before writing anything)."""
    if (path / ".hydra").is_dir() or (path / RESULTS).is_file():
        return True
    return (path.parent / "multirun.yaml").is_file() and not (path / "report.json").is_file()


def _load_yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:  # a half-written or hand-edited file: report, go on
        log.warning("cannot read %s: %s", path, err)
        return None


def _get(config: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(config, dict):
            return None
        config = config.get(key)
    return config


def _overrides(items: Any) -> dict[str, str]:
    pairs = (str(item).lstrip("+~").split("=", 1) for item in items or [])
    return {p[0]: p[1] for p in pairs if len(p) == 2 and not p[0].startswith("hydra.")}


def _as_number(value: Any) -> Any:
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def _settings(results: dict[str, Any], config: Any, overrides: dict[str, str]) -> dict[str, Any]:
    """results.json first (what ran), then the resolved config, then the command-line overrides."""
    target = str(_get(config, "method._target_") or "").rsplit(".", 1)[-1].lower() or None
    candidates = {
        "model": (_get(config, "model.name"), overrides.get("model")),
        "method": (_get(config, "method.name"), overrides.get("method"), target),
        "granularity": (_get(config, "granularity.name"), overrides.get("granularity")),
        "sparsity": (_get(config, "sparsity"), overrides.get("sparsity")),
        "weighting": (_get(config, "weighting.scheme"), overrides.get("weighting")),
        "packages": (_get(config, "packages"), overrides.get("packages")),
    }
    settings = {
        key: _as_number(next((v for v in (results.get(key), *rest) if v is not None), None))
        for key, rest in candidates.items()
    }
    settings.update((k, v) for k, v in overrides.items() if k not in SETTINGS)
    return settings


def _numbers(block: dict[str, Any], skip: Sequence[str]) -> dict[str, float]:
    return {
        k: v
        for k, v in block.items()
        if k not in skip
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


def _read_results(path: Path) -> tuple[dict[str, Any], str]:
    """(results, error); the error is empty for a completed job."""
    if not path.is_file():
        return {}, "no results.json (killed, out of memory, or still running)"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {}, f"unreadable results.json: {err}"
    if not isinstance(data, dict):
        return {}, "unreadable results.json: not a JSON object"
    status = data.get("status", "completed")
    if status == "failed":
        return data, str(data.get("error") or "failed (no error message)")
    if status != "completed":
        error = data.get("error") or "crashed, killed or still running"
        return data, f"incomplete ({status}): {error}"
    return data, ""


def _evaluated(result: JobResult, block: Any) -> JobResult:
    """Fill metrics, info and images_dir from an "eval" or "dense" block."""
    if not isinstance(block, dict):
        return result
    result.metrics = _numbers(block, EVAL_INFO)
    result.info = {"eval_set": block.get("set"), **{k: block.get(k) for k in EVAL_INFO}}
    if block.get("images_dir"):
        images = Path(block["images_dir"]).expanduser()
        result.images_dir = images if images.is_absolute() else result.path / images
    return result


def read_job(path: Path, name: str) -> JobResult:
    config = _load_yaml(path / ".hydra" / "config.yaml")
    overrides = _overrides(_load_yaml(path / ".hydra" / "overrides.yaml"))
    results, error = _read_results(path / RESULTS)
    settings = _settings(results, config, overrides)
    job = JobResult(name, path, "failed" if error else "completed", error, settings)
    if error:
        return job
    job.run = _numbers(results, (*SETTINGS, "eval", "dense"))
    _evaluated(job, results.get("eval"))
    if isinstance(results.get("dense"), dict):
        dense = {"model": settings["model"], "method": DENSE, "granularity": None, "sparsity": 0.0}
        reference = JobResult(f"{name}/dense", path, "completed", "", dense)
        job.dense = _evaluated(reference, results["dense"])
    return job


def collect(sweep_dir: str | Path) -> list[JobResult]:
    """Every job of the sweep, in job order; failures are logged as warnings."""
    root = Path(sweep_dir)
    dirs = find_job_dirs(root)
    jobs = [read_job(p, p.name if p == root else p.relative_to(root).as_posix()) for p in dirs]
    for job in jobs:
        if not job.completed:
            log.warning(
                "job %s (%s, sparsity %s) failed: %s", job.job, job.method, job.sparsity, job.error
            )
    return jobs


# ---------------------------------------------------------------------------- organising


def references(jobs: Sequence[JobResult]) -> dict[str, JobResult]:
    """The dense reference of each model: the "dense" block of its first job that has one, else
    its first completed `method=dense` job."""
    found: dict[str, JobResult] = {}
    for job in jobs:
        if job.dense is not None:
            found.setdefault(job.model, job.dense)
    for job in jobs:
        if job.completed and job.method == DENSE:
            found.setdefault(job.model, job)
    return found


def groups(jobs: Sequence[JobResult]) -> dict[tuple[str, str], list[JobResult]]:
    """The pruned jobs, failed ones included, by (model, granularity)."""
    found: dict[tuple[str, str], list[JobResult]] = {}
    for job in jobs:
        if job.method != DENSE:
            granularity = str(job.settings.get("granularity") or "?")
            found.setdefault((job.model, granularity), []).append(job)
    return dict(sorted(found.items()))


def varying_keys(jobs: Sequence[JobResult]) -> list[str]:
    """Settings other than model, method, granularity and sparsity that differ among the jobs."""
    pruned = [j for j in jobs if j.method != DENSE]
    extra = sorted({k for j in pruned for k in j.settings if k not in SETTINGS})
    return [
        k
        for k in ("weighting", "packages", *extra)
        if len({str(j.settings.get(k)) for j in pruned}) > 1
    ]


def row_order(job: JobResult, keys: Sequence[str]) -> tuple[Any, ...]:
    """Dense, obsdiff, then the other methods alphabetically; sparsity ascending."""
    rank = {DENSE: 0, "obsdiff": 1}.get(job.method, 2)
    sparsity = -1.0 if job.sparsity is None else job.sparsity
    return (rank, job.method, sparsity, tuple(str(job.settings.get(k)) for k in keys))


def series_label(job: JobResult, keys: Sequence[str], sep: str = ", ") -> str:
    return sep.join([job.method, *(f"{k}={job.settings.get(k)}" for k in keys)])


def metric_columns(jobs: Sequence[JobResult]) -> list[str]:
    """Metrics that at least one job has: quality (known, then others), then efficiency;
    per-attribute breakdowns (prompt_fidelity_<attribute>) stay in the CSV only."""
    present = {k for job in jobs for k in job.metrics}
    others = sorted(
        k for k in present - set(QUALITY) - set(EFFICIENCY) if not k.startswith(BREAKDOWNS)
    )
    return [k for k in QUALITY if k in present] + others + [k for k in EFFICIENCY if k in present]


def best_per_sparsity(jobs: Sequence[JobResult], metric: str) -> dict[float | None, float]:
    """Best value of a metric with a known direction among the completed pruned jobs, at each
    sparsity where at least two jobs have it."""
    higher = HIGHER_IS_BETTER.get(metric)
    if higher is None:
        return {}
    values: dict[float | None, list[float]] = {}
    for job in jobs:
        if job.completed and job.method != DENSE and metric in job.metrics:
            values.setdefault(job.sparsity, []).append(job.metrics[metric])
    return {s: max(v) if higher else min(v) for s, v in values.items() if len(v) > 1}


# ---------------------------------------------------------------------------- tables


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


# ---------------------------------------------------------------------------- plots


def axis_label(metric: str) -> str:
    higher = HIGHER_IS_BETTER.get(metric)
    label = LABELS.get(metric, metric)
    return label if higher is None else f"{label} ({'higher' if higher else 'lower'} is better)"


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text)


def _panel(
    ax: Any, metric: str, jobs: Sequence[JobResult], keys: Sequence[str], colours: dict[str, str]
) -> None:
    """One line per method (colours shared by every panel), in row order."""
    lines: dict[str, list[tuple[float, float]]] = {label: [] for label in colours}
    for job in jobs:
        if job.completed and job.sparsity is not None and metric in job.metrics:
            lines[series_label(job, keys)].append((job.sparsity, job.metrics[metric]))
    for label, points in lines.items():
        if points:
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=label, color=colours[label])


def plot_metrics(jobs: Sequence[JobResult], out_dir: Path) -> list[Path]:
    """`<out_dir>/<metric>.png` for every metric with a value: metric against sparsity, a line
    per method, the dense value dashed; a panel per model and granularity."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys, refs, sections = varying_keys(jobs), references(jobs), groups(jobs)
    series = sorted((j for j in jobs if j.method != DENSE), key=lambda j: row_order(j, keys))
    labels = dict.fromkeys(series_label(j, keys) for j in series)  # ordered, unique
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for metric in metric_columns([*jobs, *refs.values()]):
        fig = Figure(figsize=(5.0 * max(len(sections), 1), 3.8), layout="constrained")
        FigureCanvasAgg(fig)  # rendered by Agg, no pyplot state: nothing to close
        axes = fig.subplots(1, max(len(sections), 1), squeeze=False)[0]
        for ax, ((model, granularity), members) in zip(axes, sections.items(), strict=False):
            _panel(ax, metric, members, keys, colours)
            ax.set_xticks(sorted({j.sparsity for j in members if j.sparsity is not None}))
            reference = refs.get(model)
            if reference is not None and metric in reference.metrics:
                ax.axhline(reference.metrics[metric], linestyle="--", color="black", label=DENSE)
            ax.set(title=f"{model} · {granularity}", xlabel="sparsity", ylabel=axis_label(metric))
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
        path = out_dir / f"{_slug(metric)}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


# ---------------------------------------------------------------------------- image grid


def _image_ids(images_dir: Path | None) -> set[int]:
    if images_dir is None or not images_dir.is_dir():
        return set()
    return {int(p.stem) for p in images_dir.glob("*.png") if p.stem.isdigit()}


def default_prompt_id(dirs: Sequence[Path | None]) -> int | None:
    """The smallest id with an image in every folder that has images (else in any)."""
    found = [ids for ids in map(_image_ids, dirs) if ids]
    if not found:
        return None
    return min(set.intersection(*found) or set.union(*found))


def _cell(images_dir: Path | None, prompt_id: int) -> Image.Image:
    path = None if images_dir is None else images_dir / f"{prompt_id:07d}.png"
    if path is None or not path.is_file():
        return Image.new("RGB", (CELL, CELL), PLACEHOLDER)
    with Image.open(path) as image:
        return ImageOps.pad(image.convert("RGB"), (CELL, CELL), color=(255, 255, 255))


def cell_origin(row: int, col: int) -> tuple[int, int]:
    """Top-left pixel of a grid cell; column 0 is the dense model."""
    return LEFT + col * (CELL + GAP), TOP + row * (CELL + GAP)


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
    draw.text((4, 4), f"prompt {prompt_id}", fill=(0, 0, 0))
    for col, title in enumerate([DENSE, *(f"sparsity {s:g}" for s in sparsities)]):
        draw.text((cell_origin(0, col)[0] + 2, 4), title, fill=(0, 0, 0))
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
        written.append(out_dir / name)
    return written


# ---------------------------------------------------------------------------- the app


def write_report(
    jobs: Sequence[JobResult], sweep_dir: Path, out_dir: Path, prompt_id: int | None = None
) -> dict[str, Any]:
    """Write every output into `out_dir`; return what `report.json` records."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(jobs, out_dir / "results.csv")
    (out_dir / "results.md").write_text(markdown_report(jobs, f"Sweep report: `{sweep_dir}`"))
    files = [out_dir / "results.csv", out_dir / "results.md"]
    files += plot_metrics(jobs, out_dir / "plots")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m obsdiff.report",
        description="Tables, plots and an image grid from a Hydra sweep (or one run) directory.",
    )
    parser.add_argument("sweep_dir", type=Path, help="multirun directory, or one run directory")
    parser.add_argument(
        "--out", type=Path, default=None, metavar="DIR", help="default: <sweep_dir>/report"
    )
    parser.add_argument(
        "--prompt-id",
        type=int,
        default=None,
        metavar="ID",
        help="prompt id of the grid images; default: the smallest one every job has",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    sweep_dir: Path = args.sweep_dir.expanduser()
    if not sweep_dir.is_dir():
        log.error("%s is not a directory: pass a Hydra sweep or run directory", sweep_dir)
        return 2
    jobs = collect(sweep_dir)
    if not jobs:
        log.error("%s holds no run directories (with .hydra/ or results.json)", sweep_dir)
        return 2
    out_dir = args.out if args.out is not None else sweep_dir / "report"
    summary = write_report(jobs, sweep_dir, out_dir, args.prompt_id)
    log.info(
        "%d completed jobs and %d that did not complete; wrote %d files to %s",
        summary["completed"],
        summary["failed"],
        len(summary["files"]) + 1,
        out_dir,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
