"""Recovery on the toy (`make bench-recover`): six one-shot prunes, each before and after two
recovery budgets, with paired intervals; and Lightning's training overhead.

    python experiments/bench_recover.py                       # the sweeps, reports, claims rows
    python experiments/bench_recover.py --steps 250 recover.lr=1e-4   # other budgets, settings
    python experiments/bench_recover.py --only throughput     # Fabric vs plain PyTorch only

For each recipe `conf/experiment/recovery_toy_*.yaml` (OBS-Diff and L1 structured 30%, OBS-Diff
and Wanda 70% unstructured, OBS-Diff and Magnitude 2:4), two sweeps of `obsdiff.run` into
`<out>/<recipe>/`: `oneshot/` (`recover=none`) and `recovered/` (`recover=distill`, `--steps`,
500 by default, and 4 times as many, at the recovery's defaults, on the toy's 32 calibration
prompts). The same prompts, seeds and evaluation (72 held-out prompts, 576 images a model) for
all, so every comparison is paired. Rerunning the same command resumes: finished jobs are
skipped. `obsdiff.report` then reads each recipe's folder (both sweeps) into
`--reports/<recipe>/`, and `experiments/toy_claims.py` updates the recovery rows of the claims
table.

The throughput comparison trains the same student (the toy, L1 structured 30%) on the same
recorded calls with the same loss, optimizer and clipping, `--throughput-steps` steps, once with
obsdiff's loop on Lightning Fabric and once with a plain PyTorch loop, alternated
`--repeats` times; it prints steps per second and the ratio (median and range).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from obsdiff.recovery.data import DenoiserCall, draw_calls, record_calls, step_density
from obsdiff.recovery.loop import distil, distillation_loss
from obsdiff.recovery.settings import RecoverySettings


REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("recovery_toy_structured", "recovery_toy_unstructured", "recovery_toy_2_4")
LONGER = 4  # the second budget, in multiples of the first

log = logging.getLogger("bench_recover")


def sweep_commands(recipe: str, out: Path, steps: int, overrides: list[str]) -> list[list[str]]:
    """The one-shot sweep and the recovered sweep of one recipe (`overrides`: more settings of
    the recovered one, e.g. recover.lr=1e-4)."""
    run = [sys.executable, "-m", "obsdiff.run", "--multirun", f"+experiment={recipe}"]
    run += [f"tracking.group={recipe}"]
    return [
        [*run, "recover=none", f"hydra.sweep.dir={out / recipe / 'oneshot'}"],
        [
            *run, "recover=distill", f"recover.steps={steps},{LONGER * steps}", *overrides,
            f"hydra.sweep.dir={out / recipe / 'recovered'}",
        ],
    ]  # fmt: skip


def run_sweeps(out: Path, reports: Path, steps: int, overrides: list[str]) -> int:
    failed = 0
    for recipe in RECIPES:
        for command in sweep_commands(recipe, out, steps, overrides):
            log.info("$ %s", " ".join(command))
            started = time.perf_counter()
            failed += subprocess.run(command, cwd=REPO_ROOT).returncode != 0
            log.info("%.0f s", time.perf_counter() - started)
        report = [sys.executable, "-m", "obsdiff.report", str(out / recipe)]
        failed += subprocess.run([*report, "--out", str(reports / recipe)]).returncode != 0
    return failed


# ------------------------------------------------------------------------- throughput
def plain_loop(
    student: nn.Module,
    teacher: nn.Module,
    blocks: tuple[list[nn.Module], list[nn.Module]],
    draw: Callable[[int], DenoiserCall],
    steps: int,
    settings: RecoverySettings,
) -> None:
    """The same training steps as `obsdiff.recovery.loop.distil` (float32, no accumulation,
    no mask, no checkpoint), written in plain PyTorch."""
    teacher.eval().requires_grad_(False)
    student.train()
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    for index in range(steps):
        loss = distillation_loss(student, teacher, *blocks, draw(index), settings)
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), settings.gradient_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def throughput(steps: int, repeats: int) -> dict[str, object]:
    """Student steps per second on the toy: obsdiff's Fabric loop against a plain loop."""
    import obsdiff
    from obsdiff.api import model_from_config

    adapter = model_from_config("toy")
    prompts = (REPO_ROOT / "obsdiff/data/toy/calibration_prompts.txt").read_text().splitlines()
    prompts = [p for p in prompts if p.strip()][:32]
    teacher = adapter.load()
    pruned = obsdiff.prune(adapter.load(), "l1", "structured", 0.3, prompts=prompts[:1])
    cpu = torch.device("cpu")
    calls = record_calls(teacher, adapter, prompts, 16, 0, cpu)
    order = draw_calls(calls, step_density(teacher, adapter.denoising_steps(teacher)), steps, 0)

    def draw(index: int) -> DenoiserCall:
        return calls[order[index]]

    settings = RecoverySettings(steps=steps, lr=5e-5)
    teacher_denoiser = adapter.denoiser(teacher)
    timings: dict[str, list[float]] = {"fabric": [], "plain": []}
    for _ in range(repeats):
        for kind in ("fabric", "plain"):
            student = copy.deepcopy(pruned.denoiser)
            blocks = (
                [b for _, b in adapter.blocks(student)],
                [b for _, b in adapter.blocks(teacher_denoiser)],
            )
            torch.manual_seed(0)
            started = time.perf_counter()
            if kind == "fabric":
                distil(student, teacher_denoiser, *blocks, draw, settings, {}, cpu)
            else:
                plain_loop(student, teacher_denoiser, blocks, draw, steps, settings)
            timings[kind].append(steps / (time.perf_counter() - started))
    # the plain loop's speed over Fabric's, minus 1: Lightning's overhead, run by run
    overheads = [p / f - 1 for f, p in zip(timings["fabric"], timings["plain"], strict=True)]
    overhead = statistics.median(overheads)
    log.info(
        "throughput: Fabric %.2f steps/s, plain PyTorch %.2f steps/s (medians of %d); Lightning's "
        "overhead %+.1f%% (range %+.1f%% to %+.1f%%)",
        statistics.median(timings["fabric"]), statistics.median(timings["plain"]), repeats,
        100 * overhead, 100 * min(overheads), 100 * max(overheads),
    )  # fmt: skip
    return {
        "steps": steps,
        "repeats": repeats,
        "samples_per_call": int(calls[0].kwargs["hidden_states"].shape[0]),
        "fabric_steps_per_second": timings["fabric"],
        "plain_steps_per_second": timings["plain"],
        "overhead_median": overhead,
        "overhead_range": [min(overheads), max(overheads)],
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "toy_recovery")
    parser.add_argument("--reports", type=Path, default=REPO_ROOT / "experiments" / "toy_recovery")
    parser.add_argument("--steps", type=int, default=500, help="the first budget (optimizer steps)")
    parser.add_argument("--only", choices=("sweeps", "throughput"), default=None)
    parser.add_argument("--throughput-steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    failed = 0
    args.reports.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "throughput"):
        result = throughput(args.throughput_steps, args.repeats)
        (args.reports / "throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.only in (None, "sweeps"):
        failed += run_sweeps(args.out, args.reports, args.steps, overrides)
        claims = [
            sys.executable, str(REPO_ROOT / "experiments" / "toy_claims.py"), str(args.out),
            "--update", str(REPO_ROOT / "experiments" / "toy_quality" / "claims.md"),
        ]  # fmt: skip
        failed += subprocess.run(claims).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
