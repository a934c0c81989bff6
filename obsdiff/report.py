"""`python -m obsdiff.report <sweep dir>`: tables, plots and an image grid from a Hydra sweep.

Reads every job directory of a multirun (`<sweep>/<n>/`; a sweep of sweeps or a single run
directory works too) and its `results.json`, and writes `<sweep>/report/`:
`results.csv` (one row per job plus one dense row per model, every metric with its 95%
interval), `differences.csv` (each job minus its reference, paired over the same prompts and
seeds, with intervals), `results.md` (a table per model and granularity, the best method at
each sparsity in bold where its lead is significant, the paired differences, then the jobs that
did not complete; the speed-up with its interval, flagged where that contains 1),
`plots/<metric>.png` (metric against sparsity with intervals, a line per method, dense dashed;
not the timings each job took in its own process, under its own load), `plots/speedup.png` (the
speed-ups timed back to back within each job, with their intervals), `grid.png` (one prompt's
image per method and sparsity, captioned) and `report.json`. A job without a readable,
completed `results.json` is listed as one that did not complete, with why, never dropped. It
logs each job read and each stage; `--out` is checked before any work.

From Python, the same sweep as DataFrames:

    from obsdiff.report import collect, per_image
    jobs = collect("outputs/run/multiruns/<time>")      # one row per job
    images = per_image("outputs/run/multiruns/<time>")  # one row per image of every job
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

from obsdiff.eval.bootstrap import BootstrapSettings
from obsdiff.reporting.collect import SETTINGS, read_jobs, references
from obsdiff.reporting.compare import PairedScores
from obsdiff.reporting.tables import results_frame
from obsdiff.reporting.write import write_report
from obsdiff.utils.file_checks import unwritable_folder_problem


log = logging.getLogger(__name__)


def collect(sweep_dir: str | Path) -> pd.DataFrame:
    """The sweep as a DataFrame: one row per job (and one per dense reference), its settings,
    status, achieved sparsity, every metric with `<metric>_low` / `<metric>_high` (the 95%
    interval) and the run's figures; what `results.csv` holds."""
    return results_frame(read_jobs(sweep_dir))


def per_image(sweep_dir: str | Path) -> pd.DataFrame:
    """Every per-image score of every completed job (and of the dense references), one row per
    image: the job and its settings, then id, prompt, seed, file and one column per metric."""
    jobs = read_jobs(sweep_dir)

    frames = []
    for job in [*references(jobs).values(), *jobs]:
        if not job.completed or job.per_image is None or not job.per_image.is_file():
            continue
        table = pd.read_csv(job.per_image)
        settings = {k: job.settings.get(k) for k in SETTINGS} | job.settings
        for position, (key, value) in enumerate({"job": job.job, **settings}.items()):
            table.insert(position, key, value)
        frames.append(table)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _selector(text: str | None) -> dict[str, str] | None:
    if text is None:
        return None
    pairs = [part.split("=", 1) for part in text.split(",")]
    if any(len(p) != 2 or not p[0] for p in pairs):
        raise argparse.ArgumentTypeError(
            f"--reference {text!r}: give KEY=VALUE[,KEY=VALUE], e.g. method=wanda"
        )
    return {k.strip(): v.strip() for k, v in pairs}


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
    parser.add_argument(
        "--reference",
        type=_selector,
        default=None,
        metavar="KEY=VALUE",
        help="the job every other is compared with at each sparsity, e.g. method=wanda or "
        "weighting=uniform; default: the best method that is not OBS-Diff (by the headline "
        "metric), or the best job where all are OBS-Diff",
    )
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (BCa)")
    parser.add_argument(
        "--fid-resamples",
        type=int,
        default=200,
        help="resamples of paired FID differences (each recomputes two FIDs: with Inception "
        "features about a second each; 0 leaves FID differences out)",
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    sweep_dir: Path = args.sweep_dir.expanduser()
    if not sweep_dir.is_dir():
        log.error("%s is not a directory: pass a Hydra sweep or run directory", sweep_dir)
        return 2
    out_dir: Path = args.out.expanduser() if args.out is not None else sweep_dir / "report"
    why = unwritable_folder_problem(out_dir)
    if why is not None:
        option = "--out" if args.out is not None else "the default --out"
        log.error(
            "%s %s: %s; pass a directory the report can be written into", option, out_dir, why
        )
        return 2
    try:
        settings = BootstrapSettings(args.resamples, args.fid_resamples, seed=args.seed)
    except ValueError as err:
        log.error("%s", err)
        return 2
    jobs = read_jobs(sweep_dir)
    if not jobs:
        log.error("%s holds no run directories (with .hydra/ or results.json)", sweep_dir)
        return 2
    scores = PairedScores(settings)
    summary = write_report(jobs, sweep_dir, out_dir, args.prompt_id, scores, args.reference)
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
