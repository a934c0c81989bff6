"""Reproduce a paper table: one sweep of `obsdiff.run`, then `obsdiff.report` on it.

    python experiments/reproduce.py table1_sd3_medium                       # basic launcher
    python experiments/reproduce.py table6_weighting --launcher joblib --jobs 2
    python experiments/reproduce.py table4_sd35_large --launcher slurm hydra.launcher.partition=gpu
    python experiments/reproduce.py table1 --dry-run                        # every Table 1 model
    python experiments/reproduce.py toy_ --reports experiments/toy_quality  # make bench-quality

A table name runs every recipe whose name starts with it (table1 -> its three models). The recipes
are Hydra configs in conf/experiment/ (the protocol in paper.yaml); extra arguments are Hydra
overrides (e.g. paths.data_root=/data calibration.prompts=/data/cc3m.tsv). The report is written
to <sweep dir>/report even when some jobs failed (they are listed as failed).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = REPO_ROOT / "conf" / "experiment"
SHARED = {"paper", "toy"}  # protocols the recipes include, not sweeps themselves
LAUNCHERS = {
    "basic": [],
    "joblib": ["hydra/launcher=joblib"],
    "slurm": ["hydra/launcher=slurm"],
}

log = logging.getLogger("reproduce")


def recipes(prefix: str) -> list[str]:
    available = sorted(p.stem for p in RECIPES.glob("*.yaml") if p.stem not in SHARED)
    names = [name for name in available if name.startswith(prefix)]
    if not names:
        raise SystemExit(f"no recipe matches {prefix!r}; available: {', '.join(available)}")
    return names


def commands(
    recipe: str, launcher: str, jobs: int | None, overrides: list[str], sweep_dir: Path
) -> list[list[str]]:
    run = [sys.executable, "-m", "obsdiff.run", "--multirun", f"+experiment={recipe}"]
    run += LAUNCHERS[launcher]
    if jobs is not None:
        run.append(f"hydra.launcher.n_jobs={jobs}")
    run += [f"hydra.sweep.dir={sweep_dir}", f"tracking.group={recipe}", *overrides]
    return [run, [sys.executable, "-m", "obsdiff.report", str(sweep_dir)]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("table", help="a recipe of conf/experiment or a prefix (table1)")
    parser.add_argument("--launcher", choices=sorted(LAUNCHERS), default="basic")
    parser.add_argument("--jobs", type=int, default=None, help="joblib: parallel jobs")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "paper")
    parser.add_argument(
        "--stamp",
        default=time.strftime("%Y-%m-%d_%H-%M-%S"),
        help="sweep directory name under <out>/<recipe>/ (default: the time)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument(
        "--reports",
        type=Path,
        default=None,
        help="also copy each sweep's report/ to <reports>/<recipe>/",
    )
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    failed = 0
    for recipe in recipes(args.table):
        sweep_dir = args.out / recipe / args.stamp
        for command in commands(recipe, args.launcher, args.jobs, overrides, sweep_dir):
            log.info("$ %s", " ".join(command))
            if not args.dry_run:
                # A sweep with failed jobs exits non-zero; the report still runs and lists them.
                failed += subprocess.run(command, cwd=REPO_ROOT).returncode != 0
        if args.reports is not None and (sweep_dir / "report").is_dir():
            shutil.copytree(sweep_dir / "report", args.reports / recipe, dirs_exist_ok=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
