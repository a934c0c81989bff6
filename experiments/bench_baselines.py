"""The field's other pruning methods against OBS-Diff, on the toy (`make bench-baselines`):
Diff-Pruning, EcoDiff and importance-weighted OBS (the CFG-response and the attention maps)
beside OBS-Diff, L1 and Wanda, structured at
10/20/30% and unstructured at 50/70%, one-shot, and at structured 30% after the same recovery
(the toy analogue of the paper's Table 10: OBS-Diff + fine-tuning against Diff-Pruning +
fine-tuning), each against the dense model on the same prompts and seeds.

    python experiments/bench_baselines.py                     # every job, the report, the summary
    python experiments/bench_baselines.py --only summary      # the summary of finished jobs

Every job is one `obsdiff.run` of the toy (`+experiment=toy`: its 32 calibration prompts, 72
held-out prompts, 576 images a model) into `<out>/<job>/`, two at a time on one thread each
(`--workers`); a rerun skips finished jobs.
`obsdiff.report` reads them all into `--reports/report/` (paired 95% intervals between jobs),
`experiments/toy_claims.py` adds the baselines' rows to the claims table, and the summary
(`--reports/summary.md`, `summary.json`) gives each job's parameters, pruning seconds and peak
memory (the process's peak resident set, CPU), prompt fidelity, PSNR, SSIM and feature distance
to the dense images, each with its 95% interval over the prompts.

Method settings: every method at its defaults (Diff-Pruning's official threshold rule walks all
1000 levels on the toy's flow matching loss), but EcoDiff, trained on the 32 calibration
prompts one at a time (its official batch of 1) with its FLUX learning rate 0.5 for heads and
neurons: at its SDXL rate (0.1) the toy's 32 optimizer steps a training cannot move a logit from
3 below 0. Recovery: `recover=distill`, 500 steps (bench-recover's first budget), for OBS-Diff and
Diff-Pruning (the paper's Table 10 pair).
"""

from __future__ import annotations

import json
from pathlib import Path

from bench_compress import METRICS, cell, job_row, toy_benchmark  # the toy benchmarks' shared parts


STRUCTURED = ["granularity=structured"]
ECODIFF = ["method=ecodiff", "calibration.batch_size=1", "method.lr_heads=0.5",
           "method.lr_neurons=0.5"]  # fmt: skip
CFG_RESPONSE = ["method=obsdiff", "method.token_weighting=cfg_response"]
ATTENTION = ["method=obsdiff", "method.token_weighting=attention"]
STRUCTURED_METHODS: dict[str, list[str]] = {
    "obsdiff": ["method=obsdiff"],
    "l1": ["method=l1"],
    "diff_pruning": ["method=diff_pruning"],
    "ecodiff": ECODIFF,
    "obsdiff_cfg_response": CFG_RESPONSE,
    "obsdiff_attention": ATTENTION,
}
UNSTRUCTURED_METHODS: dict[str, list[str]] = {
    "obsdiff": ["method=obsdiff"],
    "wanda": ["method=wanda"],
    "diff_pruning": ["method=diff_pruning"],
    "obsdiff_cfg_response": CFG_RESPONSE,
    "obsdiff_attention": ATTENTION,
}
RECOVERED = ["recover=distill", "recover.steps=500"]
JOBS: dict[str, list[str]] = {  # the job's folder: its settings
    **{
        f"{name}_structured{round(100 * s)}": [*STRUCTURED, f"sparsity={s}", *settings]
        for s in (0.1, 0.2, 0.3)
        for name, settings in STRUCTURED_METHODS.items()
    },
    **{
        f"{name}_unstructured{round(100 * s)}": ["granularity=unstructured", f"sparsity={s}",
                                                 *settings]
        for s in (0.5, 0.7)
        for name, settings in UNSTRUCTURED_METHODS.items()
    },
    **{
        f"{name}_structured30_recovered": [*STRUCTURED, "sparsity=0.3", *settings, *RECOVERED]
        for name, settings in STRUCTURED_METHODS.items()
        if name in ("obsdiff", "diff_pruning")
    },
}  # fmt: skip
# the longest first (EcoDiff's trainings, Diff-Pruning's 1000 backwards), side by side with the rest
JOBS = dict(
    sorted(JOBS.items(), key=lambda job: not job[0].startswith(("ecodiff", "diff_pruning")))
)


def summary(out: Path, reports: Path) -> None:
    rows = [row for name in JOBS if (row := job_row(name, out / name)) is not None]
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "# The field's baselines on the toy (`make bench-baselines`)",
        "",
        f"{len(rows)} of {len(JOBS)} jobs finished. Each: 576 images of 72 held-out prompts; "
        "PSNR, SSIM and feature distance against the dense model's images of the same seeds; "
        "95% intervals over the prompts. Pruning seconds: the whole prune (load, any gradient "
        "pass, calibration, solve) on 2 CPU cores; peak memory: the process's peak resident "
        "set during it. Recovered: 500 distillation steps after the prune.",
        "",
        "| job | sparsity | parameters | pruning s | peak memory (MB) | recovery s | prompt "
        "fidelity | PSNR | SSIM | feature distance |",
        "|---|--:|--:|--:|--:|--:|---|---|---|---|",
    ]
    for row in rows:
        recovery = "–" if row["recovery_seconds"] is None else f"{row['recovery_seconds']}"
        lines.append(
            f"| {row['job']} | {row['achieved_sparsity']:.4f} | {row['parameters']:,} | "
            f"{row['prune_seconds']:.1f} | {row['peak_memory_bytes'] / 1e6:,.0f} | {recovery} | "
            + " | ".join(cell(row[k], row[f"{k}_interval"]) for k in METRICS)
            + " |"
        )
    dense = next(
        (r.get("dense_prompt_fidelity") for r in rows if r.get("dense_prompt_fidelity")), None
    )
    lines += ["", f"Dense prompt fidelity: {cell(dense)}."]
    (reports / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    return toy_benchmark(argv, __doc__.split("\n")[0], "toy_baselines", JOBS, summary, workers=2)


if __name__ == "__main__":
    raise SystemExit(main())
