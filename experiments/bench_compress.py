"""Compression that pays without special kernels, on the toy (`make bench-compress`): the
quality-size frontier of low-rank modulation, OBS-Diff with and without it, and depth pruning
with and without recovery, each against the dense model on the same prompts and seeds.

    python experiments/bench_compress.py                      # every job, the report, the summary
    python experiments/bench_compress.py --only summary       # the summary of finished jobs

Every job is one `obsdiff.run` of the toy (`+experiment=toy`: its calibration, 72 held-out
prompts, 576 images a model, `save=true` for the bytes on disk, 6 timed repeats of dense and
compressed one-image generations back to back) into `<out>/<job>/`; a rerun skips finished jobs.
`obsdiff.report` then reads them all into `--reports/` (paired 95% intervals between jobs),
`experiments/toy_claims.py` adds the compression rows to the claims table, and the summary
(`--reports/summary.md`, `summary.json`) gives each job's parameters, bytes on disk, seconds per
image dense and compressed, prompt fidelity, PSNR, SSIM and feature distance to the dense
images, each with its 95% interval over the prompts, and the toy's and the real configs'
parameters by role.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import obsdiff
from obsdiff.artifacts.record import RecordError, RunRecord


REPO_ROOT = Path(__file__).resolve().parents[1]
COMMON = ["+experiment=toy", "save=true", "eval.efficiency.repeats=6", "tracking.mode=disabled"]
DENSE = ["method=dense", "granularity=unstructured", "sparsity=0.0"]
LOW_RANK = ["modulation=low_rank"]
RECOVERED = ["recover=distill", "recover.steps=500"]
JOBS: dict[str, list[str]] = {  # the job's folder: its settings
    **{f"modulation_rank{r}": [*DENSE, *LOW_RANK, f"modulation.rank={r}"] for r in (2, 4, 8, 16)},
    **{f"modulation_energy{e}": [*DENSE, *LOW_RANK, f"modulation.energy={e}"]
       for e in (0.99, 0.999)},
    "obsdiff_unstructured50": ["granularity=unstructured", "sparsity=0.5"],
    "obsdiff_unstructured50_modulation": [
        "granularity=unstructured", "sparsity=0.5", *LOW_RANK, "modulation.energy=0.999"
    ],
    "obsdiff_structured30": ["granularity=structured", "sparsity=0.3"],
    "obsdiff_structured30_modulation": [
        "granularity=structured", "sparsity=0.3", *LOW_RANK, "modulation.energy=0.999"
    ],
    **{
        f"depth_{method}_{blocks}{'_recovered' if recovered else ''}": [
            "granularity=depth", f"method=block_{method}", f"sparsity={blocks / 6:.4f}",
            *(RECOVERED if recovered else []),
        ]
        for method in ("cosine", "output_loss")
        for blocks in (1, 2)  # of the toy's 6 (4 candidates: the first and last stay)
        for recovered in (False, True)
    },
}  # fmt: skip
METRICS = ("prompt_fidelity", "psnr", "ssim", "toy_feature_distance")
ROLE_MODELS = ("toy", "sd3_medium", "sd35_large", "flux_dev", "sdxl_base", "pixart_sigma")

log = logging.getLogger("bench_compress")


def run_jobs(out: Path, jobs: dict[str, list[str]], workers: int = 1) -> int:
    """Each job as one `obsdiff.run` of the toy into `out/<job>` (a finished one is skipped by
    the app), `workers` at a time, each then on cores / workers threads (the toy's small
    matrices gain little from a second thread; two jobs side by side gain almost twice); the
    number that failed."""
    env = dict(os.environ)
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)

    def run(name: str) -> bool:
        command = [sys.executable, "-m", "obsdiff.run", *COMMON, *jobs[name]]
        command += [f"hydra.run.dir={out / name}"]
        log.info("$ %s", " ".join(command))
        started = time.perf_counter()
        failed = subprocess.run(command, cwd=REPO_ROOT, env=env).returncode != 0
        log.info("%s: %.0f s", name, time.perf_counter() - started)
        return failed

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return sum(pool.map(run, jobs))


def job_row(name: str, run_dir: Path) -> dict[str, Any] | None:
    """One finished job's figures (None while it is not finished)."""
    try:
        record = RunRecord.read(run_dir)
    except RecordError:
        return None
    if not record.completed or record.prune is None or record.eval is None:
        return None
    metrics, intervals = record.eval.metrics, record.eval.intervals
    row: dict[str, Any] = {
        "job": name,
        "achieved_sparsity": record.prune.achieved_sparsity,
        "parameters": record.prune.params_after,
        "parameters_dense": record.prune.params_before,
        "prune_seconds": record.prune.wall_seconds,
        "peak_memory_bytes": record.prune.peak_memory_bytes,
        "bytes_on_disk": (run_dir / "denoiser.safetensors").stat().st_size,
        "recovery_seconds": None if record.recover is None else round(record.recover.seconds),
    }
    for key in METRICS:
        row[key] = metrics.get(key)
        row[f"{key}_interval"] = intervals.get(key)
    if record.speed is not None:
        row["dense_seconds_per_image"] = record.speed.dense_seconds_per_image
        row["seconds_per_image"] = record.speed.pruned_seconds_per_image
        row["speedup"] = record.speed.speedup
        row["speedup_interval"] = record.speed.speedup_interval
    if record.dense is not None:
        row["dense_prompt_fidelity"] = record.dense.metrics.get("prompt_fidelity")
    return row


def cell(value: Any, interval: Any = None, digits: int = 4) -> str:
    if value is None:
        return "–"
    text = f"{value:.{digits}g}"
    if interval:
        text += f" [{interval[0]:.{digits}g}, {interval[1]:.{digits}g}]"
    return text


def roles() -> list[str]:
    """The parameters by role of the toy and the real configs (from their architectures)."""
    lines = [
        "| model | parameters | attention | FFN | modulation | embeddings | rest |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for model in ROLE_MODELS:
        plan = obsdiff.memory_plan(model)
        assert plan.roles is not None
        shares = [f"{plan.roles.share(role):.1%}" for role in plan.roles.counts]
        lines.append(f"| {model} | {plan.roles.total:,} | " + " | ".join(shares) + " |")
    return lines


def summary(out: Path, reports: Path) -> None:
    rows = [row for name in JOBS if (row := job_row(name, out / name)) is not None]
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "# Compression on the toy (`make bench-compress`)",
        "",
        f"{len(rows)} of {len(JOBS)} jobs finished. Each: 576 images of 72 held-out prompts; "
        "PSNR, SSIM and feature distance against the dense model's images of the same seeds; "
        "95% intervals over the prompts; seconds per image: medians of 6 one-image generations, "
        "dense and compressed back to back (2 CPU cores).",
        "",
        "| job | parameters | bytes on disk | s/image dense / compressed (speed-up) | prompt "
        "fidelity | PSNR | SSIM | feature distance |",
        "|---|--:|--:|---|---|---|---|---|",
    ]
    for row in rows:
        speed = "–"
        if row.get("seconds_per_image") is not None:
            speed = (
                f"{row['dense_seconds_per_image']:.4f} / {row['seconds_per_image']:.4f} "
                f"({cell(row['speedup'], row['speedup_interval'], 3)})"
            )
        lines.append(
            f"| {row['job']} | {row['parameters']:,} | {row['bytes_on_disk']:,} | {speed} | "
            + " | ".join(cell(row[k], row[f"{k}_interval"]) for k in METRICS)
            + " |"
        )
    dense = next(
        (r.get("dense_prompt_fidelity") for r in rows if r.get("dense_prompt_fidelity")), None
    )
    lines += ["", f"Dense prompt fidelity: {cell(dense)}.", "", "## Parameters by role", ""]
    lines += roles()
    (reports / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def toy_benchmark(
    argv: list[str] | None,
    description: str,
    folder: str,
    jobs: dict[str, list[str]],
    summary: Callable[[Path, Path], None],
    workers: int = 1,
) -> int:
    """A toy benchmark's command line: its jobs into `outputs/<folder>`, the report, the claims
    rows (`experiments/toy_claims.py`), then `summary(out, reports)` into `experiments/<folder>`;
    `--only jobs` or `--only summary`; `workers` jobs at a time (`--workers`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / folder)
    parser.add_argument("--reports", type=Path, default=REPO_ROOT / "experiments" / folder)
    parser.add_argument("--only", choices=("jobs", "summary"), default=None)
    parser.add_argument("--workers", type=int, default=workers, help="jobs at a time")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    failed = 0
    if args.only in (None, "jobs"):
        failed += run_jobs(args.out, jobs, args.workers)
        report = [sys.executable, "-m", "obsdiff.report", str(args.out)]
        failed += subprocess.run([*report, "--out", str(args.reports / "report")]).returncode != 0
        claims = [
            sys.executable, str(REPO_ROOT / "experiments" / "toy_claims.py"), str(args.out),
            "--update", str(REPO_ROOT / "experiments" / "toy_quality" / "claims.md"),
        ]  # fmt: skip
        failed += subprocess.run(claims).returncode != 0
    if args.only in (None, "summary"):
        summary(args.out, args.reports)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    return toy_benchmark(argv, __doc__.split("\n")[0], "toy_compress", JOBS, summary)


if __name__ == "__main__":
    raise SystemExit(main())
