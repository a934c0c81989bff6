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
import logging
from pathlib import Path

from obsdiff.reporting.collect import collect
from obsdiff.reporting.write import write_report


log = logging.getLogger(__name__)


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
