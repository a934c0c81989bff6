"""The memory plans of the real models (README, "Memory plan"), from their shipped config files:
no weights downloaded, a few seconds on a CPU.

    python experiments/memory_plans.py            # Markdown tables on stdout

For SD3-Medium, SD3.5-Large, Flux.1-dev and SDXL (OBS-Diff, unstructured, every target block):
weights, the largest package's statistics and the predicted peak at 1, 4 and 10 packages, and
the fewest packages that fit 24, 48 and 80 GB, without and with offload (statistics and the
components other than the denoiser in CPU memory); then SD3-Medium's predicted drops between
1, 4, 10 and 20 packages beside the paper's Table 7 (RTX 4090, 30% unstructured); then the
recovery's plans of SD3-Medium, SD3.5-Large and Flux.1-dev (bf16-mixed, one prompt a batch, the
feature loss on), with and without per-block gradient checkpointing.
"""

from __future__ import annotations

import logging
import sys

from obsdiff.api import memory_plan, model_from_config, recovery_memory_plan
from obsdiff.oneshot.job import JobError
from obsdiff.oneshot.plan import GB


MODELS = (
    "sd3_medium", "sd35_large", "flux_dev", "sdxl_base", "qwen_image", "flux2_dev", "wan21_t2v_14b",
    "wan22_t2v_a14b",
)  # fmt: skip
RECOVERED = ("sd3_medium", "sd35_large", "flux_dev", "qwen_image", "flux2_dev", "wan21_t2v_14b")
COUNTS = (1, 4, 10)
BUDGETS = (24, 48, 80)
PAPER_TABLE7 = {1: 30.67, 4: 24.05, 10: 22.75, 20: 22.08}  # peak GB, SD3-Medium


OFFLOAD = {"offload_statistics": True, "offload_components": True}


def fewest(model: str, budget: float, offload: bool) -> str:
    options = OFFLOAD if offload else {}
    try:
        return str(memory_plan(model, packages="auto", memory_budget=budget, **options).packages)
    except JobError:
        return "none"


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    out = [
        "| model (dtype) | weights GB (denoiser) | packages | statistics GB, largest package "
        "| predicted peak GB | offloaded: peak GB | fewest packages for 24 / 48 / 80 GB "
        "| offloaded |",
        "|---|--:|--:|--:|--:|--:|---|---|",
    ]
    for name in MODELS:
        adapter = model_from_config(name)
        fits = " / ".join(fewest(name, b, offload=False) for b in BUDGETS)
        fits_offloaded = " / ".join(fewest(name, b, offload=True) for b in BUDGETS)
        for count in COUNTS:
            plan = memory_plan(adapter, packages=count)
            offloaded = memory_plan(adapter, packages=count, **OFFLOAD)
            first = count == COUNTS[0]
            weights = f"{plan.weights_bytes / GB:.2f} ({offloaded.weights_bytes / GB:.2f})"
            out.append(
                f"| {f'{name} ({adapter.dtype})' if first else ''} "
                f"| {weights if first else ''} | {count} "
                f"| {plan.statistics_peak_bytes / GB:.2f} | {plan.predicted_peak_bytes / GB:.2f} "
                f"| {offloaded.predicted_peak_bytes / GB:.2f} "
                f"| {fits if first else ''} | {fits_offloaded if first else ''} |"
            )
    out += [
        "",
        "| SD3-Medium, packages | predicted peak GB | predicted drop | paper peak GB (Table 7) "
        "| paper drop |",
        "|--:|--:|--:|--:|--:|",
    ]
    previous: tuple[float, float] | None = None
    for count, paper in PAPER_TABLE7.items():
        peak = memory_plan("sd3_medium", sparsity=0.3, packages=count).predicted_peak_bytes / GB
        drops = ("–", "–") if previous is None else (
            f"{previous[0] - peak:.2f}", f"{previous[1] - paper:.2f}"
        )  # fmt: skip
        out.append(f"| {count} | {peak:.2f} | {drops[0]} | {paper:.2f} | {drops[1]} |")
        previous = (peak, paper)
    out += [
        "",
        "| recovery (bf16-mixed) | samples a call | teacher GB | student + gradients + AdamW GB "
        "| activations GB: none / per-block checkpointing | peak GB: none / checkpointing "
        "| fewest GPUs of 24 / 48 / 80 GB (FSDP): none / checkpointing |",
        "|---|--:|--:|--:|--:|--:|---|",
    ]
    for name in RECOVERED:
        plan = recovery_memory_plan(name, batch_size=1, precision="bf16-mixed")
        devices = [
            " / ".join(str(plan.fewest_devices(size, c) or "none") for size in BUDGETS)
            for c in (False, True)
        ]
        training = plan.student_bytes + plan.gradient_bytes + plan.optimizer_bytes
        out.append(
            f"| {name} ({plan.dtype}) | {plan.samples_per_call} | {plan.teacher_bytes / GB:.1f} "
            f"| {training / GB:.1f} | {plan.activations(False) / GB:.1f} / "
            f"{plan.activations(True) / GB:.1f} | {plan.peak_bytes(False) / GB:.1f} / "
            f"{plan.peak_bytes(True) / GB:.1f} | {devices[0]}; {devices[1]} |"
        )
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
