"""Weight quantization on top of pruning: every family's do-not-compress list, zeros kept exact,
less memory, the half-precision path; the quantize app on a toy 2:4 run, the run app's stage and
its sweep; the gate (evaluate app exit 3, export refused or forced); the export loaded quantized
by plain diffusers where obsdiff cannot be imported; every bad input refused before loading."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import torch
from app_runner import run_in_process
from registry import TINY_BY_ADAPTER, tiny_adapter
from torch import nn

import obsdiff
from obsdiff.artifacts.record import RunRecord
from obsdiff.calibration.packages import list_units
from obsdiff.export import main as export_main
from obsdiff.models.base import pattern_regex
from obsdiff.models.experts import single_models
from obsdiff.quantization import quantizable_linears
from obsdiff.report import main as report_main


pytestmark = pytest.mark.integration

PROMPTS = ["a red circle", "a blue square on green"]
TOY = ["model=toy", "calibration=toy", "model.sampling.num_inference_steps=2"]
TOY += ["calibration.num_prompts=4", "packages=1"]
TOY_EVAL = ["eval.prompts.num_prompts=4", "eval.images_per_prompt=1", "eval.efficiency.repeats=1"]
TINY = ["model=tiny_sd3", "calibration=tiny", "model.sampling.num_inference_steps=2"]
TINY += ["calibration.num_prompts=2", "packages=1"]
LOADED = "loaded model"  # the log line of ModelAdapter.load
QUANTIZED = "Int8Tensor"  # torchao's int8 weight type


def options(adapter: obsdiff.models.ModelAdapter) -> dict[str, object]:
    """`obsdiff.prune`'s sampling for a tiny model: its config's (not its pipeline's defaults,
    which for Wan are 81 frames at 480 x 832)."""
    return {"sampling": asdict(adapter.sampling)}


def is_quantized(module: nn.Module) -> bool:
    return type(module.weight).__name__ == QUANTIZED  # type: ignore[union-attr]


def latents(pipe: object, adapter: obsdiff.models.ModelAdapter) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = pipe(
            prompt=PROMPTS, generator=generator, output_type="latent", **adapter.call_kwargs()
        )  # type: ignore[operator]
    return adapter.outputs(out)


@pytest.mark.parametrize("cls", list(TINY_BY_ADAPTER), ids=lambda c: c.family)
def test_every_familys_do_not_compress_list(cls: type[obsdiff.models.ModelAdapter]) -> None:
    """Each pattern names a module of the family's tiny models; no pruning target (unstructured
    or structured) is on the list; the linears neither pruned nor listed are only a UNet's linear
    `proj_in`/`proj_out`; quantization leaves the listed linears in the model's dtype and every
    family still samples once quantized."""
    named: set[str] = set()
    for model in TINY_BY_ADAPTER[cls]:
        adapter = tiny_adapter(model, sampling={"num_inference_steps": 2})
        pipe = adapter.load()
        denoiser = adapter.denoiser(pipe)
        named |= {name for _, part in single_models(denoiser) for name, _ in part.named_modules()}
        blocks = (0, len(adapter.blocks(denoiser)))
        targets = {n for ref in list_units(adapter, denoiser, blocks) for n in ref.module_names}
        list_units(adapter, denoiser, blocks, structured=True)  # raises on a listed consumer
        reached = dict(quantizable_linears(adapter, denoiser))
        rest = {name for name in reached if name not in targets}
        assert all(re.fullmatch(r".*attentions\.\d+\.proj_(in|out)", n) for n in rest), rest
        kept = [
            (name, module)
            for prefix, part in single_models(denoiser)
            for name, module in part.named_modules()
            if isinstance(module, nn.Linear) and adapter.is_kept_out(name)
        ]
        assert kept, model  # every family keeps something (its embedders at least)
        pruned = obsdiff.prune(
            pipe, "magnitude", "unstructured", 0.5, prompts=PROMPTS, **options(adapter)
        )
        result = obsdiff.quantize(pruned)
        assert result.quantization is not None
        assert result.quantization.layers_quantized == len(reached)
        assert not any(is_quantized(module) for _, module in kept)
        assert all(is_quantized(module) for module in reached.values())
        assert torch.isfinite(latents(result.pipeline, adapter)).all()
    for patterns in cls.do_not_compress().values():
        for pattern in patterns:
            regex = pattern_regex(pattern)
            assert any(re.fullmatch(regex, name) for name in named), f"{cls.family}: {pattern}"


@pytest.mark.parametrize("scheme", ["int8_weight_only", "int8_dynamic"])
def test_int8_keeps_every_pruned_zero_and_takes_less_memory(scheme: str) -> None:
    adapter = tiny_adapter("tiny_sd3", sampling={"num_inference_steps": 2})
    pruned = obsdiff.prune(
        adapter.load(), "magnitude", "semi_2_4", 0.5, prompts=PROMPTS, **options(adapter)
    )
    before = latents(pruned.pipeline, adapter)
    targets = {r["name"] for r in pruned.manifest["records"] if r.get("type", "layer") == "layer"}
    quantized = obsdiff.quantize(pruned, scheme)
    result = quantized.quantization
    assert result is not None and result.scheme == scheme
    assert result.weight_bytes_after < 0.75 * result.weight_bytes_before
    for name in targets:  # per layer: half its weights were zero, and every one still is
        zeros, kept = result.layers[name]
        weight = quantized.denoiser.get_submodule(name).weight
        assert zeros == weight.numel() // 2 and kept == zeros
        assert int((weight.dequantize() == 0).sum()) >= zeros
    assert quantized.denoiser.proj_out.weight.dtype == torch.float32  # on the list
    after = latents(quantized.pipeline, adapter)
    assert float((after - before).norm() / before.norm()) < 0.1  # int8: close, not equal
    with pytest.raises(ValueError, match="quantized already"):
        obsdiff.quantize(quantized, scheme)


def test_the_list_quantized_too_when_asked() -> None:
    adapter = tiny_adapter("tiny_flux")
    pruned = obsdiff.prune(
        adapter.load(), "magnitude", "unstructured", 0.5, prompts=PROMPTS, **options(adapter)
    )
    every = obsdiff.quantize(pruned, keep_out=False).quantization
    assert every is not None and every.layers_kept == 0 and every.scheme.endswith("_all")
    assert is_quantized(pruned.denoiser.proj_out) and is_quantized(pruned.denoiser.x_embedder)


def test_half_precision_weights_quantize_and_the_list_stays_in_bfloat16() -> None:
    adapter = tiny_adapter("tiny_sd3", dtype="bfloat16", sampling={"num_inference_steps": 2})
    pruned = obsdiff.prune(
        adapter.load(), "magnitude", "semi_2_4", 0.5, prompts=PROMPTS, **options(adapter)
    )
    quantized = obsdiff.quantize(pruned, "int8_weight_only")
    assert quantized.quantization is not None
    assert quantized.quantization.zeros_kept == quantized.quantization.zeros_before > 0
    assert quantized.denoiser.proj_out.weight.dtype == torch.bfloat16
    assert torch.isfinite(latents(quantized.pipeline, adapter).float()).all()


def test_a_structured_quantized_run_exports_as_obsdiffs_folder_and_loads_quantized(
    tmp_path: Path,
) -> None:
    adapter = tiny_adapter("tiny_sd3", sampling={"num_inference_steps": 2})
    pruned = obsdiff.prune(
        adapter.load(), "l1", "structured", 0.25, prompts=PROMPTS, **options(adapter)
    )
    obsdiff.quantize(pruned, "int8_dynamic", run_dir=tmp_path / "run")
    out = obsdiff.export(tmp_path / "run", tmp_path / "export", pipeline=adapter.load())
    assert (out / "manifest.json").is_file() and not (out / "model_index.json").exists()
    loaded = obsdiff.load_pruned(out, pipeline=adapter.load())
    assert loaded.quantization is not None and loaded.quantization.scheme == "int8_dynamic"
    assert torch.equal(latents(loaded.pipeline, adapter), latents(pruned.pipeline, adapter))
    assert "## Quantization" in (out / "README.md").read_text()


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A toy 2:4 prune, then the quantize app on it (int8 weight-only, evaluated, gated)."""
    root = tmp_path_factory.mktemp("quantize")
    pruned, quantized = root / "pruned", root / "quantized"
    result = run_in_process(
        "obsdiff.prune", *TOY, "granularity=semi_2_4", f"hydra.run.dir={pruned}",
        f"paths.output_root={root}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    result = run_in_process(
        "obsdiff.quantize", f"pruned={pruned}", "quantize=int8_weight_only", *TOY_EVAL,
        'gate="psnr>=10"', f"hydra.run.dir={quantized}", f"paths.output_root={root}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    return {"root": root, "pruned": pruned, "quantized": quantized}


@pytest.mark.slow
@pytest.mark.xdist_group("toy_quantize")  # the module's runs are made once, on one worker
def test_the_quantize_app_on_a_toy_2_4_run(toy_runs: dict[str, Path]) -> None:
    record = RunRecord.read(toy_runs["quantized"])
    result = record.quantize
    assert result is not None and result.zeros_kept == result.zeros_before > 0
    # float32 -> int8 where quantized; the list (a third of the toy: embedders, modulation) stays
    assert result.weight_bytes_after < 0.6 * result.weight_bytes_before
    assert record.identity.quantize == "int8_weight_only" and record.identity.method == "obsdiff"
    assert record.prune is not None and record.prune.achieved_sparsity == pytest.approx(0.5)
    assert record.eval is not None and record.dense is not None
    assert {"psnr", "ssim", "toy_feature_distance"} <= set(record.eval.metrics)
    assert record.gate is not None and record.gate[0].passed
    assert record.gate[0].statistic.startswith("lower bound of the 95% interval")
    manifest = json.loads((toy_runs["quantized"] / "manifest.json").read_text())
    assert manifest["quantize"]["scheme"] == "int8_weight_only"
    assert manifest["quantized_from"] == str(toy_runs["pruned"].resolve())
    loaded = obsdiff.load_pruned(toy_runs["quantized"])  # quantized as the run did
    assert loaded.quantization is not None and loaded.quantization.layers == result.layers
    first = next(name for name in result.layers)
    assert is_quantized(loaded.denoiser.get_submodule(first))
    as_saved = obsdiff.load_pruned(toy_runs["quantized"], quantized=False)
    assert as_saved.denoiser.get_submodule(first).weight.dtype == torch.float32


@pytest.mark.slow
@pytest.mark.xdist_group("toy_quantize")
def test_a_failed_gate_exits_3_and_the_export_refuses_it(
    toy_runs: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    quantized = toy_runs["quantized"]
    failed = run_in_process(
        "obsdiff.evaluate", f"pruned={quantized}", *TOY_EVAL, 'gate="psnr>=1000,ssim>=0"',
        f"hydra.run.dir={tmp_path / 'evaluated'}", f"paths.output_root={toy_runs['root']}",
    )  # fmt: skip
    assert failed.returncode == 3, failed.stdout[-3000:]
    assert "psnr>=1000: FAILED (lower bound of the 95% interval" in failed.stdout
    record = RunRecord.read(tmp_path / "evaluated")
    assert record.completed and [c.passed for c in record.gate or []] == [False, True]

    out = tmp_path / "export"
    assert export_main([str(quantized), str(out), "--gate", "psnr>=1000"]) == 2
    assert "the gate failed (psnr>=1000" in caplog.text and not out.exists()
    assert export_main([str(quantized), str(out), "--gate", "psnr>=1000", "--force"]) == 0
    card = (out / "README.md").read_text()
    assert "**Warning: this export failed its quality gate** (`psnr>=1000`)" in card
    assert "| `psnr>=1000` |" in card and "## Quantization" in card
    caplog.clear()
    unquantized = tmp_path / "unquantized"
    args = [str(toy_runs["pruned"]), str(unquantized), "--quantize", "int8_weight_only"]
    assert export_main([*args, "--gate", "psnr>=10"]) == 2  # judged on another model
    assert "which is of the unquantized model" in caplog.text


# plain diffusers where obsdiff cannot be imported: each card's code, then the modules' types
PLAIN = """
import json, sys, torch
sys.modules["obsdiff"] = None
found = {{}}
for name, load in json.loads(sys.argv[1]).items():
    exec(load)
    modules = pipe.transformer.named_modules()
    linears = [(n, m) for n, m in modules if isinstance(m, torch.nn.Linear)]
    found[name] = {{
        "types": {{n: type(m.weight).__name__ for n, m in linears}},
        "dtypes": sorted({{str(m.weight.dtype) for _, m in linears
                          if type(m.weight).__name__ == "Parameter"}}),
    }}
print(json.dumps(found))
"""
EXPORTS = ("quantized run", "--quantize", "--quantize --prequantized")


def card_load_code(out: Path) -> str:
    card = (out / "README.md").read_text()
    return re.search(r"## How to load\n\n```python\n(.*?)```", card, re.S).group(1)  # type: ignore[union-attr]


@pytest.mark.slow
@pytest.mark.xdist_group("toy_quantize")
def test_plain_diffusers_loads_the_quantized_exports(
    toy_runs: dict[str, Path], tmp_path: Path
) -> None:
    """The quantized run's export, the pruned run's with --quantize (both quantized at load by
    the card's code) and with --prequantized too, loaded by each card's code in one process
    where obsdiff cannot be imported: the listed modules stay float32 parameters, every other
    linear is int8, as obsdiff's own quantization made them."""
    loads = {}
    for how in EXPORTS:
        out = tmp_path / how.replace("-", "").replace(" ", "_")
        if how == "quantized run":
            obsdiff.export(toy_runs["quantized"], out)
        else:
            args = [str(toy_runs["pruned"]), str(out), *how.replace("--quantize", "").split()]
            assert export_main([*args, "--quantize", "int8_weight_only"]) == 0
        loads[how] = card_load_code(out)
    result = subprocess.run(
        [sys.executable, "-c", PLAIN.format(), json.dumps(loads)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    expected = obsdiff.load_pruned(toy_runs["quantized"])
    types = {
        name: type(module.weight).__name__
        for name, module in expected.denoiser.named_modules()
        if isinstance(module, nn.Linear)
    }
    for how in EXPORTS:
        assert found[how]["types"] == types, how
        assert found[how]["dtypes"] == ["torch.float32"], how
    kept = [name for name, kind in types.items() if kind == "Parameter"]
    assert kept and all(expected.adapter.is_kept_out(name) for name in kept)


@pytest.mark.slow
def test_the_run_apps_stage_in_a_sweep_and_its_report(tmp_path: Path) -> None:
    """`obsdiff.run -m quantize=none,int8_weight_only`: the pruned and the pruned + int8 model
    on the same prompts and seeds, the run directory loading quantized, the report telling the
    two apart."""
    sweep = tmp_path / "sweep"
    result = run_in_process(
        "obsdiff.run", "--multirun", *TINY, "granularity=semi_2_4", "method=magnitude",
        "quantize=none,int8_weight_only", "eval=tiny", "eval.prompts.num_prompts=2",
        f"paths.output_root={tmp_path}", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    plain, quantized = RunRecord.read(sweep / "0"), RunRecord.read(sweep / "1")
    assert plain.quantize is None and quantized.quantize is not None
    assert quantized.quantize.zeros_kept == quantized.quantize.zeros_before > 0
    assert plain.eval is not None and quantized.eval is not None
    assert plain.eval.metrics["psnr"] != quantized.eval.metrics["psnr"]
    assert "weights in memory" in result.stdout
    assert obsdiff.load_pruned(sweep / "1").quantization is not None
    assert report_main([str(sweep)]) == 0
    rows = pd.read_csv(sweep / "report" / "results.csv")
    pruned = rows[rows["method"] == "magnitude"]
    assert sorted(pruned["quantize"].fillna("none")) == ["int8_weight_only", "none"]
    assert pruned["weight_bytes"].notna().sum() == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("app", "overrides", "message"),
    [
        ("obsdiff.quantize", ["quantize=nosuch"], "quantize=nosuch"),
        ("obsdiff.quantize", ["quantize=none"], "quantize=none: this app quantizes"),
        ("obsdiff.quantize", ["quantize=float8_weight_only", "device=cpu"], "needs a CUDA GPU"),
        ("obsdiff.quantize", ['gate="lpips<=0.15"'], "names 'lpips', which this evaluation"),
        ("obsdiff.quantize", ['gate="lpips<0.15"'], "'lpips<0.15' is not a limit"),
        ("obsdiff.quantize", ["gate=[lpips<=0.15]"], "quote the limits for Hydra"),
        ("obsdiff.quantize", ["quantize.group_size=64"], "drop it (quantize.group_size=null)"),
        ("obsdiff.run", ["quantize=int4_weight_only"], "quantize=int4_weight_only needs a CUDA"),
        ("obsdiff.evaluate", ['gate="psnr>=30"'], "names 'psnr', which this evaluation"),
    ],
)
def test_bad_input_exits_2_with_one_message_before_loading(
    toy_runs: dict[str, Path], tmp_path: Path, app: str, overrides: list[str], message: str
) -> None:
    common = {
        "obsdiff.quantize": [f"pruned={toy_runs['pruned']}", *TOY_EVAL],
        "obsdiff.run": [*TOY, *TOY_EVAL],
        "obsdiff.evaluate": ["model=toy", *TOY_EVAL],  # a dense model: nothing to compare with
    }[app]
    result = run_in_process(app, *common, *overrides, f"paths.output_root={tmp_path}")
    output = result.stdout
    assert result.returncode == 2, output[-3000:]
    assert output.count("[ERROR]") == 1 and message in output, output[-3000:]
    assert LOADED not in output and "Traceback" not in output
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.xdist_group("toy_quantize")
def test_a_group_size_that_does_not_divide_a_width_is_refused_before_loading(
    toy_runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """int4 on a GPU the test pretends to have: the toy's widths (64) refuse group size 128."""
    monkeypatch.setattr("obsdiff.artifacts.pruned.check_device", lambda *args: None)
    result = run_in_process(
        "obsdiff.quantize", f"pruned={toy_runs['pruned']}", "quantize=int4_weight_only",
        *TOY_EVAL, f"paths.output_root={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 2, result.stdout[-3000:]
    assert "quantize.group_size=128 does not divide the input width" in result.stdout
    assert LOADED not in result.stdout and not any(tmp_path.iterdir())
    again = run_in_process(
        "obsdiff.quantize", f"pruned={toy_runs['quantized']}", *TOY_EVAL,
        f"paths.output_root={tmp_path}",
    )  # fmt: skip
    assert again.returncode == 2 and "is quantized already (int8_weight_only)" in again.stdout
