"""What an export adds for quantization and for a quality gate: the checks (before anything
loads), the load code that quantizes at load with plain diffusers, and the card's sections.

A quantized export holds the weights in the model's dtype, as every other export: the card's
code loads them with `quantization_config=TorchAoConfig(FqnToConfig(...))`, the family's
do-not-compress list mapped to None (left in the model's dtype), the rest to the scheme's
config, which is what obsdiff's own quantization did (`obsdiff.quantization.apply`). With
`prequantized`, the denoiser is written already quantized instead, in safetensors (torchao's
flattened tensors, which diffusers reads back with torchao >= 0.16): smaller on disk, no pickle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from obsdiff.artifacts.record import RunRecord
from obsdiff.eval.gate import GateCheck, GateError, check_gate_metrics, gate_checks, parse_gate
from obsdiff.models.base import ModelAdapter
from obsdiff.quantization import QuantizeSettings, fqn_to_config_code


class ExportCheckError(ValueError):
    """A quantization or gate the export cannot take (`ExportError` in the export)."""


def export_quantization(
    manifest: dict[str, Any], quantize: QuantizeSettings | None, run_dir: Any
) -> QuantizeSettings | None:
    """The quantization an export writes: the run's own (a quantized run), or `quantize` (one
    the run does not have: the weights are quantized at load); a run quantized otherwise than
    `quantize` asks is refused."""
    recorded = manifest.get("quantize")
    if recorded is None:
        return quantize
    own = QuantizeSettings(
        recorded["scheme"], recorded.get("group_size"), recorded.get("keep_out", True)
    )
    if quantize is not None and quantize != own:
        raise ExportCheckError(
            f"{run_dir} is quantized with {own.name}; export it with --quantize {own.scheme} "
            f"(or without --quantize), or export the run it came from "
            f"({manifest.get('quantized_from')}) with --quantize {quantize.scheme}"
        )
    return own


def checked_gate(
    expressions: Sequence[str] | str | None,
    record: RunRecord | None,
    quantization: QuantizeSettings | None,
    manifest: dict[str, Any],
    force: bool,
    evaluate: str,
) -> list[GateCheck] | None:
    """The gate's limits checked against the run's evaluation (the interval's bound, as the
    evaluate app checks it); refused when the evaluation is not of the model exported (a
    quantization added at export) or lacks a metric, and when a limit fails unless `force`
    (the card then says so). `evaluate`: the command that evaluates the run."""
    if not expressions:
        return None
    try:
        limits = parse_gate(expressions, "--gate")
    except GateError as err:
        raise ExportCheckError(str(err)) from None
    if quantization is not None and "quantize" not in manifest:
        raise ExportCheckError(
            f"--gate checks the run's evaluation, which is of the unquantized model; quantize "
            f"and evaluate it first (python -m obsdiff.quantize pruned=<run> "
            f"quantize={quantization.scheme}), then export that run"
        )
    if record is None or record.eval is None:
        raise ExportCheckError(
            f"--gate needs the run's evaluation against the dense model, which it has not: "
            f"`{evaluate}`, or export a run of obsdiff.run or obsdiff.quantize"
        )
    measured = [name for name in record.eval.metrics if name in record.eval.intervals]
    measured += [name for name in record.eval.metrics if name not in measured]
    try:
        check_gate_metrics(limits, measured, "--gate")
    except GateError as err:
        raise ExportCheckError(str(err)) from None
    checks = gate_checks(limits, record.eval.metrics, record.eval.intervals)
    failed = [check for check in checks if not check.passed]
    if failed and not force:
        lines = "; ".join(f"{c.limit}: {c.statistic} {c.measured:.4g}" for c in failed)
        raise ExportCheckError(
            f"the gate failed ({lines}): nothing was exported; pass --force to export it "
            "with a warning on its card"
        )
    return checks


def quantized_load_code(
    adapter: type[ModelAdapter],
    settings: QuantizeSettings,
    experts: Sequence[str],
    denoiser_class: str,
    where: str,
    base: str | None,
    dtype: str,
    extra: str,
) -> str:
    """Plain-diffusers code that loads the export's denoiser(s) quantized at load, then the
    pipeline around them (`base`: the pipeline's other components come from the base model)."""
    lines = [
        "import torch",
        f"from diffusers import DiffusionPipeline, TorchAoConfig, {denoiser_class}",
        *fqn_to_config_code(adapter, settings),
        "",
    ]
    for name in experts:
        lines.append(
            f'{name} = {denoiser_class}.from_pretrained("{where}", subfolder="{name}", '
            f"quantization_config=quantization, dtype=torch.{dtype})"
        )
    joined = ", ".join(f"{name}={name}" for name in experts)
    lines.append(f'pipe = DiffusionPipeline.from_pretrained("{base or where}", {joined}{extra})')
    return "\n".join(lines)


def prequantized_load_code(where: str, dtype: str, extra: str) -> str:
    """Plain-diffusers code that loads a pre-quantized export (its config says how; `dtype`:
    the model's, which diffusers would otherwise take as bfloat16 for a quantized model)."""
    return "\n".join(
        [
            "import torch",
            "from diffusers import DiffusionPipeline  # and torchao >= 0.16 installed",
            "",
            f'pipe = DiffusionPipeline.from_pretrained("{where}", dtype=torch.{dtype}{extra})',
        ]
    )


def quantization_card_lines(
    adapter: type[ModelAdapter],
    settings: QuantizeSettings,
    record: RunRecord | None,
    prequantized: bool,
) -> list[str]:
    """The card's quantization section: the scheme, what stays in the model's dtype and why,
    what the run measured."""
    kept = "; ".join(
        f"{why}: {', '.join(f'`{p}`' for p in patterns)}"
        for why, patterns in adapter.do_not_compress().items()
    )
    stored = (
        "stored quantized (torchao's tensors in safetensors)"
        if prequantized
        else "stored in the model's dtype and quantized by torchao as it loads"
    )
    lines = [
        f"Weights quantized with torchao's `{settings.config_code()}` ({settings.name}), {stored}.",
        "",
        (
            f"Left in the model's dtype (the do-not-compress list): {kept}."
            if settings.keep_out
            else "**Every linear is quantized, the do-not-compress list too** (an ablation)."
        ),
    ]
    done = None if record is None else record.quantize
    if done is not None:
        lines += [
            "",
            "| | before | after |",
            "|---|--:|--:|",
            f"| denoiser weights in memory (bytes) | {done.weight_bytes_before:,} "
            f"| {done.weight_bytes_after:,} |",
            f"| linears quantized / kept | | {done.layers_quantized} / {done.layers_kept} |",
            f"| exact zeros of the quantized linears | {done.zeros_before:,} "
            f"| {done.zeros_kept:,} |",
        ]
    return lines


def gate_card_lines(checks: Sequence[GateCheck]) -> list[str]:
    """The card's gate section: each limit, what was measured, whether it held."""
    lines = ["| limit | measured | | passed |", "|---|--:|---|---|"]
    lines += [
        f"| `{c.limit}` | {c.measured:.4g} | {c.statistic} | {'yes' if c.passed else '**no**'} |"
        for c in checks
    ]
    return lines


def gate_warning(checks: Sequence[GateCheck]) -> list[str]:
    """The warning at the top of a card exported with --force past a failed gate."""
    failed = [c for c in checks if not c.passed]
    if not failed:
        return []
    names = ", ".join(f"`{c.limit}`" for c in failed)
    return [
        f"> **Warning: this export failed its quality gate** ({names}): it was exported with "
        "--force. See the gate's table below before using it.",
        "",
    ]
