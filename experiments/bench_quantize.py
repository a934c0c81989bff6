"""Pruned and quantized, on the toy (`make bench-quantize`): int8 weight quantization (torchao)
on top of the dense model and of OBS-Diff's unstructured, 2:4 and structured prunes, each with the
family's do-not-compress list kept in the model's dtype and with it quantized too, against the
dense model on the same prompts and seeds.

    python experiments/bench_quantize.py                      # every job, the report, the summary
    python experiments/bench_quantize.py --only summary       # the summary of finished jobs

Every job is one `obsdiff.run` of the toy (`+experiment=toy`: its calibration, 72 held-out
prompts, 576 images a model, `save=true`, 6 timed repeats of dense and compressed one-image
generations back to back) into `<out>/<job>/`; a rerun skips finished jobs. `obsdiff.report`
reads them all into `--reports/report/` (paired 95% intervals between jobs),
`experiments/toy_claims.py` adds the quantization rows to the claims table, and the summary
(`--reports/summary.md`, `summary.json`) gives each job's bytes on disk (the run's weights in the
model's dtype, and the denoiser exported pre-quantized), bytes of weights in memory, seconds per
image dense and compressed, prompt fidelity, PSNR, SSIM and feature distance to the dense images,
each with its 95% interval over the prompts. The GPU schemes (float8, int4, int8 with 2:4
kernels) are `make gpu-check`'s.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from bench_compress import cell, toy_benchmark  # the toy benchmarks' shared command line

import obsdiff
from obsdiff.artifacts.record import RecordError, RunRecord
from obsdiff.quantization import weight_bytes


DENSE = ["method=dense", "granularity=unstructured", "sparsity=0.0"]
PRUNES = {
    "dense": DENSE,
    "obsdiff_unstructured50": ["granularity=unstructured", "sparsity=0.5"],
    "obsdiff_2_4": ["granularity=semi_2_4", "sparsity=0.5"],
    "obsdiff_structured30": ["granularity=structured", "sparsity=0.3"],
}
INT8 = ["quantize=int8_weight_only"]
ALL = ["quantize.keep_out=false"]  # the do-not-compress list quantized too
JOBS: dict[str, list[str]] = {  # the job's folder: its settings
    "dense_int8_weight_only": [*DENSE, *INT8],
    "dense_int8_weight_only_all": [*DENSE, *INT8, *ALL],
    "dense_int8_dynamic": [*DENSE, "quantize=int8_dynamic"],
    "dense_int8_dynamic_all": [*DENSE, "quantize=int8_dynamic", *ALL],
    **{
        f"{name}{suffix}": [*settings, *extra]
        for name, settings in PRUNES.items()
        if name != "dense"
        for suffix, extra in (("", []), ("_int8", INT8), ("_int8_all", [*INT8, *ALL]))
    },
}  # fmt: skip
METRICS = ("prompt_fidelity", "psnr", "ssim", "toy_feature_distance")


def prequantized_bytes(run_dir: Path, record: RunRecord) -> int | None:
    """The bytes of the denoiser exported pre-quantized (torchao's safetensors); None for a run
    that is not quantized or is structured (obsdiff's folder, quantized at load)."""
    if record.quantize is None or record.identity.granularity == "structured":
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = obsdiff.export(run_dir, Path(tmp) / "export", prequantized=True)
        return sum(f.stat().st_size for f in (out / "transformer").glob("*.safetensors"))


def job_row(name: str, run_dir: Path) -> dict[str, Any] | None:
    """One finished job's figures (None while it is not finished)."""
    try:
        record = RunRecord.read(run_dir)
    except RecordError:
        return None
    if not record.completed or record.prune is None or record.eval is None:
        return None
    metrics, intervals = record.eval.metrics, record.eval.intervals
    quantized = record.quantize
    if quantized is not None:
        in_memory = quantized.weight_bytes_after
    else:  # the run's denoiser as it loads, in the model's dtype
        in_memory = weight_bytes(obsdiff.load_pruned(run_dir).denoiser)
    row: dict[str, Any] = {
        "job": name,
        "parameters": record.prune.params_after,
        "bytes_on_disk": (run_dir / "denoiser.safetensors").stat().st_size,
        "bytes_on_disk_prequantized": prequantized_bytes(run_dir, record),
        "weight_bytes_in_memory": in_memory,
        "zeros_kept": None if quantized is None else [quantized.zeros_kept, quantized.zeros_before],
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


def summary(out: Path, reports: Path) -> None:
    rows = [row for name in JOBS if (row := job_row(name, out / name)) is not None]
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "# Pruned and quantized, on the toy (`make bench-quantize`)",
        "",
        f"{len(rows)} of {len(JOBS)} jobs finished. Each: 576 images of 72 held-out prompts; "
        "PSNR, SSIM and feature distance against the dense model's images of the same seeds; "
        "95% intervals over the prompts; seconds per image: medians of 6 one-image generations, "
        "dense and compressed back to back (2 CPU cores). `_all`: the do-not-compress list "
        "quantized too. Bytes on disk: the run's weights (the model's dtype, quantized at load) "
        "and the denoiser exported pre-quantized; in memory: the denoiser's weights as loaded.",
        "",
        "| job | bytes on disk (pre-quantized) | weights in memory | zeros kept | s/image dense / "
        "compressed (speed-up) | prompt fidelity | PSNR | SSIM | feature distance |",
        "|---|--:|--:|--:|---|---|---|---|---|",
    ]
    for row in rows:
        speed = "–"
        if row.get("seconds_per_image") is not None:
            speed = (
                f"{row['dense_seconds_per_image']:.4f} / {row['seconds_per_image']:.4f} "
                f"({cell(row['speedup'], row['speedup_interval'], 3)})"
            )
        disk = f"{row['bytes_on_disk']:,}"
        if row["bytes_on_disk_prequantized"] is not None:
            disk += f" ({row['bytes_on_disk_prequantized']:,})"
        zeros = "–" if row["zeros_kept"] is None else "{:,} of {:,}".format(*row["zeros_kept"])
        lines.append(
            f"| {row['job']} | {disk} | {row['weight_bytes_in_memory']:,} | {zeros} | {speed} | "
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
    return toy_benchmark(argv, __doc__.split("\n")[0], "toy_quantize", JOBS, summary)


if __name__ == "__main__":
    raise SystemExit(main())
