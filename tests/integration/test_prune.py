"""The prune app on every tiny model and every method (from the registries): exact sparsity,
valid patterns, the saved model loads back and computes the same, resume, clear errors before any
work."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from registry import (
    PATTERN_GRANULARITIES,
    PATTERN_METHODS,
    STRUCTURED_METHODS,
    TINY_MODELS,
    calibration_overrides,
    covering,
    method_overrides,
    prunes,
)

from obsdiff.app.config import CONF_DIR, ConfigError
from obsdiff.app.settings import build_prune_job as build_job
from obsdiff.artifacts.pruned import PrunedModel, load_pruned
from obsdiff.calibration.hooks import count_hooks
from obsdiff.eval.generation import generate
from obsdiff.methods import METHODS
from obsdiff.models.loading import ModelLoadError
from obsdiff.oneshot.job import JobError
from obsdiff.oneshot.run import prune_pipeline
from obsdiff.prompts.files import PromptFileError
from obsdiff.pruning.patterns import num_to_prune


pytestmark = pytest.mark.integration

FAST = ["model.sampling.num_inference_steps=2", "packages=2", "calibration.num_prompts=2"]
TINY = {"model": "tiny_sd3", "calibration": "tiny"}
# every tiny model at every pattern granularity, every method at every granularity; Dense (the
# reference row, nothing pruned) once
PATTERN_CASES = covering(
    TINY_MODELS, [m for m in PATTERN_METHODS if prunes(m)], PATTERN_GRANULARITIES
)
PATTERN_CASES.append(("tiny_sd3", "dense", "unstructured"))
STRUCTURED_CASES = covering(
    TINY_MODELS, [m for m in STRUCTURED_METHODS if prunes(m)], ["structured"]
)
STRUCTURED_CASES.append(("tiny_sd3", "dense", "structured"))
# the field's diffusion-specific baselines (the methods with a gradient pass: Diff-Pruning,
# EcoDiff) on the toy and every tiny family, each
STRUCTURED_CASES += [
    (model, method, "structured")
    for method in STRUCTURED_METHODS
    if METHODS[method].needs_gradients
    for model in ["toy", *TINY_MODELS]
    if (model, method, "structured") not in STRUCTURED_CASES
]


def _overridden(group: str, overrides: tuple[str, ...]) -> bool:
    return any(o.startswith(f"{group}=") for o in overrides)


@pytest.fixture
def compose_prune() -> Iterator[Callable[..., DictConfig]]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):

        def _compose(*overrides: str) -> DictConfig:
            """The tiny SD3 and the bundled calibration prompts unless the overrides say."""
            tiny = [f"{g}={o}" for g, o in TINY.items() if not _overridden(g, overrides)]
            return compose(config_name="prune", overrides=tiny + list(overrides))

        yield _compose


def prune(compose_prune, run_dir: Path, *overrides: str) -> PrunedModel:  # type: ignore[no-untyped-def]
    job = build_job(compose_prune(*FAST, *overrides))
    return prune_pipeline(job, run_dir)


def target_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    saved = safetensors.torch.load_file(str(run_dir / "denoiser.safetensors"))
    return {layer["name"]: saved[layer["name"] + ".weight"] for layer in manifest["records"]}


@pytest.mark.parametrize(("model", "method", "granularity"), PATTERN_CASES)
def test_prune_matrix(
    model: str, method: str, granularity: str, compose_prune, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    overrides = [f"model={model}", f"method={method}", f"granularity={granularity}"]
    overrides += method_overrides(method)
    pruned = prune(compose_prune, tmp_path, *overrides, *calibration_overrides(model))
    results = pruned.result
    assert results is not None
    weights = target_weights(tmp_path)
    assert results.target_modules == len(weights) > 0
    expected = sum(num_to_prune(w.numel(), 0.5) for w in weights.values()) if prunes(method) else 0
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert results.target_parameters is not None
    assert results.achieved_sparsity == pytest.approx(expected / results.target_parameters)
    assert zeros == expected  # exactly the pruned weights are zero in the saved tensors
    if granularity != "unstructured" and prunes(method):  # N:M: n of every m inputs
        n, m = (int(x) for x in granularity.split("_")[1:])
        for w in weights.values():
            assert bool(((w.reshape(w.shape[0], -1, m) == 0).sum(-1) == n).all())
    assert results.params_before == results.params_after > 0  # zeros, not removed weights
    assert results.calibration_seconds > 0 or not METHODS[method]().needs_calibration
    assert results.solve_seconds >= 0 and results.peak_memory_bytes > 0
    assert not (tmp_path / "results.json").exists()  # the app shell writes the run record
    # the saved model loads back (the family's own loader), hook-free, computing the same
    loaded = load_pruned(tmp_path)
    assert loaded.manifest["method"]["name"] == method
    assert loaded.manifest["weighting"]["scheme"] == "log_decrease"
    assert count_hooks(loaded.adapter.denoiser(loaded.pipeline)) == 0
    prompts = ["a red circle", "a blue square"]
    a = generate(
        pruned.pipeline, loaded.adapter, prompts, seed=1, batch_size=2, output_type="latent"
    )
    b = generate(
        loaded.pipeline, loaded.adapter, prompts, seed=1, batch_size=2, output_type="latent"
    )
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    dense = loaded.adapter.load()  # the base model, as the manifest names it
    c = generate(dense, loaded.adapter, prompts, seed=1, batch_size=2, output_type="latent")
    assert torch.equal(a[0], c[0]) == (not prunes(method))


def test_run_key_hashes_only_the_settings_that_change_the_weights(compose_prune) -> None:  # type: ignore[no-untyped-def]
    """Where a run is written, on which device, with what logging or checkpoint policy: the
    same run (a resume with them changed is accepted); any setting of the result: another."""
    base = build_job(compose_prune(*FAST))
    assert set(base.settings()) == {
        "model", "method", "granularity", "sparsity", "weighting", "packages", "blocks",
        "prompts_sha256", "calibration",
    }  # fmt: skip
    neutral = ["+tracking.tags=[a,b]", "device=cpu", "keep_checkpoint=true", "save=false"]
    neutral += ["paths.output_root=/elsewhere", "runner=ddp_cpu", "task_name=mine"]
    neutral += ["offload.statistics=true", "offload.components=true", "runner.shard_solve=false"]
    for override in neutral:
        assert build_job(compose_prune(*FAST, override)).run_key == base.run_key, override
    changed = ["sparsity=0.4", "method.percdamp=0.02", "packages=1", "method.solve_batch_gb=0.5"]
    changed += ["weighting=uniform", "calibration.hessian_precision=bfloat16", "blocks=[0,1]"]
    changed += ["model.sampling.num_inference_steps=3", "calibration.num_prompts=1"]
    changed += ["calibration.seed=1"]
    for override in changed:
        assert build_job(compose_prune(*FAST, override)).run_key != base.run_key, override


@pytest.mark.parametrize("granularity", ["semi_2_4", "structured"])
def test_pruned_model_of_a_local_checkpoint_loads_into_memory_of_its_own(
    granularity: str, compose_prune, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A base model read from files (as the toy and every real model): `load_pruned` hands back
    every tensor in allocator memory, so the loaded pruned model computes bit for bit what the
    pruned one did, on any CPU (obsdiff.utils.memory)."""
    from obsdiff.models import SD3Adapter
    from obsdiff.utils.memory import is_allocator_aligned

    base = tmp_path / "base"
    SD3Adapter(name="tiny_sd3", tiny="sd3").load().save_pretrained(base)
    local = ["model.tiny=null", f"+model.pretrained={base}"]
    sparsity = "sparsity=0.5" if granularity == "semi_2_4" else "sparsity=0.3"
    run = tmp_path / "run"
    in_memory = prune(compose_prune, run, *local, f"granularity={granularity}", sparsity).pipeline
    loaded = load_pruned(tmp_path / "run")
    pipe, adapter = loaded.pipeline, loaded.adapter
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert all(is_allocator_aligned(m) for m in modules)
    a = generate(in_memory, adapter, ["a cat"], seed=0, batch_size=1, output_type="latent")
    b = generate(pipe, adapter, ["a cat"], seed=0, batch_size=1, output_type="latent")
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize(
    ("granularity", "modulation"),
    [
        ("unstructured", []),
        ("structured", []),
        ("unstructured", ["modulation=low_rank", "modulation.energy=0.99"]),  # factorised first
    ],
)
def test_resume_after_a_failure_gives_the_same_weights(
    granularity: str, modulation: list[str], compose_prune, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    import obsdiff.calibration.sequential as sequential

    overrides = ["model=tiny_sd3", "packages=3", f"granularity={granularity}", "sparsity=0.25"]
    if granularity == "structured":
        overrides[1] = "packages=2"
    overrides = [*modulation, *overrides]  # the last one stays the sparsity
    prune(compose_prune, tmp_path / "whole", *overrides)
    whole = safetensors.torch.load_file(str(tmp_path / "whole" / "denoiser.safetensors"))

    real = sequential.build_package
    calls = {"n": 0}

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure in package 2")
        return real(*args, **kwargs)

    monkeypatch.setattr(sequential, "build_package", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        prune(compose_prune, tmp_path / "resumed", *overrides)
    progress = json.loads((tmp_path / "resumed" / "checkpoint" / "progress.json").read_text())
    assert progress["packages_done"] == 1
    monkeypatch.setattr(sequential, "build_package", real)
    prune(compose_prune, tmp_path / "resumed", *overrides)
    resumed = safetensors.torch.load_file(str(tmp_path / "resumed" / "denoiser.safetensors"))
    assert resumed.keys() == whole.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    if modulation:  # restored from the checkpoint as two linears each
        manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
        assert manifest["structure"]["low_rank"] and manifest["modulation"]["energy"] == 0.99
    with pytest.raises(JobError, match="different run"):
        prune(compose_prune, tmp_path / "resumed", *overrides[:-1], "sparsity=0.3")


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["sparsity=1.0"], JobError, r"sparsity=1.0 must lie in \[0, 1\)"),
        (["granularity=semi_2_4", "sparsity=0.3"], JobError, "set sparsity=0.5"),
        (["granularity=structured", "method=magnitude"], JobError, "does not support structured"),
        (["granularity=structured", "method=wanda"], JobError, "does not support structured"),
        (["weighting.scheme=cosine"], ConfigError, "unknown timestep weighting"),
        (["+model.colour=red"], ConfigError, "unexpected keyword argument 'colour'"),
        (["calibration.prompts=/nonexistent/gcc3m.tsv"], PromptFileError, "does not exist"),
        (["calibration.num_prompts=1000"], PromptFileError, "1000 were asked for"),
        (["calibration.hessian_precision=fp8"], JobError, "hessian_precision"),
        (
            ["weighting=explicit", "weighting.weights=[1.0,2.0,3.0]"],
            JobError,
            "one weight per step",
        ),
    ],
)
def test_bad_settings_fail_before_loading(overrides, error, message, compose_prune) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=message):
        build_job(compose_prune(*FAST, *overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=sd3_medium"], r"model.pretrained='stabilityai/stable-diffusion-3-medium"),
        (["blocks=3"], r"blocks=3: blocks must be null .* or \[start, end\)"),
        (["blocks=[0,x]"], r"blocks=\[0, 'x'\]"),
        (["sparsity=half"], r"sparsity='half' is not a number; set e.g. sparsity=0.5"),
        (["packages=2.5"], r"packages=2.5 is not an integer"),
        (["packages=1000"], r"packages=1000 must lie in \[1, 16\]"),
        (["blocks=[0,999]"], r"blocks=\[0,999\) is outside the model's 4 blocks"),
        (["granularity=structured", "blocks=[0,9]"], r"outside the model's 4 blocks"),
        (
            ["method=wanda", "granularity=structured"],
            r"with method=wanda use granularity=unstructured or semi_2_4 or semi_4_8",
        ),
        (["granularity=structured", "sparsity=0.9"], r"sparsity=0.9 would remove all \d+ heads"),
        (["weighting=explicit"], r"config group 'weighting'.*weights"),
        (
            ["method.head_saliency=nosuch"],
            r"method.head_saliency='nosuch'; use one of reference, eq7, exact",
        ),
        (
            ["method.head_saliency=nosuch", "granularity=structured", "sparsity=0.25"],
            r"method.head_saliency='nosuch'; use one of reference, eq7, exact",
        ),
        (
            ["model.sampling.num_inference_steps=x"],
            r"model.sampling.num_inference_steps='x' is not an integer",
        ),
    ],
)
def test_every_setting_is_checked_before_any_weights_load(
    overrides, message, compose_prune, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """The inputs a new user got wrong: each names its key, and no adapter loads anything
    (packages and blocks are checked on the denoiser built from the model's config)."""
    from obsdiff.models.base import ModelAdapter

    def no_loading(self):  # type: ignore[no-untyped-def]
        raise AssertionError("weights were loaded before the settings were checked")

    monkeypatch.setattr(ModelAdapter, "load", no_loading)
    with pytest.raises((ConfigError, JobError, ModelLoadError), match=message):
        build_job(compose_prune(*FAST, *overrides))


def test_skeleton_of_a_local_pipeline_is_weightless(tmp_path: Path) -> None:
    """The layout checks of a local checkpoint read its config only (the meta device)."""
    from obsdiff.models import FluxAdapter, SD3Adapter

    tiny = FluxAdapter(name="tiny_flux", tiny="dev")
    pipe = tiny.load()
    pipe.save_pretrained(tmp_path)
    skeleton = FluxAdapter(name="local", pretrained=str(tmp_path)).denoiser_skeleton()
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    real = tiny.denoiser(pipe)
    shapes = [(n, p.shape) for n, p in skeleton.named_parameters()]
    assert shapes == [(n, p.shape) for n, p in real.named_parameters()]
    with pytest.raises(ModelLoadError, match="holds a FluxPipeline"):
        SD3Adapter(name="sd3", pretrained=str(tmp_path)).denoiser_skeleton()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["blocks=[0,99]"], r"outside the model's 4 blocks"),
        (["packages=1000"], r"packages=1000 must lie"),
    ],
)
def test_bad_ranges_fail_before_calibration(
    overrides, message, compose_prune, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(JobError, match=message):
        prune(compose_prune, tmp_path, *overrides)
    assert not (tmp_path / "checkpoint").exists()


def removed_parameters(adapter, base: torch.nn.Module, records: list[dict]) -> int:  # type: ignore[no-untyped-def]
    """Parameters the rounding rule removes, counted on the base model's shapes."""
    from obsdiff.models.structure import linear_at

    total = 0
    for record in records:
        block = base.get_submodule(record["block"])
        heads, neurons = adapter.structured_groups(block)
        removed = len(record["removed"])
        if record["kind"] == "heads":
            group = next(g for g in heads if g.attention == record["group"])
            unit = group.width // record["before"]
            producers = [linear_at(block, n) for n, _ in group.producers]
            consumers = [linear_at(block, n) for n, _ in group.consumers]
        else:
            group = next(g for g in neurons if g.consumer[0] == record["group"])
            unit = 1
            producers = [linear_at(block, n) for n, _ in group.producers]
            consumers = [linear_at(block, group.consumer[0])]
        per_unit = sum(p.in_features + (p.bias is not None) for p in producers)
        per_unit += sum(c.out_features for c in consumers)
        total += removed * unit * per_unit
    return total


@pytest.mark.parametrize(("model", "method", "granularity"), STRUCTURED_CASES)
def test_structured_prune(
    model: str, method: str, granularity: str, compose_prune, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from obsdiff.pruning.obs_structured import structured_count

    overrides = [
        f"model={model}",
        f"granularity={granularity}",
        f"method={method}",
        "sparsity=0.25",
    ]
    overrides += method_overrides(method)
    pruned = prune(compose_prune, tmp_path, *overrides, *calibration_overrides(model))
    results = pruned.result
    assert results is not None
    loaded = load_pruned(tmp_path)
    pipe, adapter, manifest = loaded.pipeline, loaded.adapter, loaded.manifest
    records = manifest["records"]
    count = structured_count if prunes(method) else lambda units, sparsity: 0
    assert records and all(len(r["removed"]) == count(r["before"], 0.25) for r in records)
    base = adapter.denoiser(adapter.load())
    expected = removed_parameters(adapter, base, records)
    assert results.params_before - results.params_after == expected
    assert (expected > 0) == prunes(method)
    assert sum(p.numel() for p in adapter.denoiser(pipe).parameters()) == results.params_after
    if prunes(method):
        assert results.tflops_after < results.tflops_before
    blocks = adapter.blocks(base)
    first, end = adapter.default_blocks(len(blocks), structured=True)
    assert {r["block"] for r in records} == {name for name, _ in blocks[first:end]}
    a = generate(pipe, adapter, ["a red circle"], seed=0, batch_size=1, output_type="latent")
    b = generate(
        pruned.pipeline, adapter, ["a red circle"], seed=0, batch_size=1, output_type="latent"
    )
    assert torch.isfinite(a[0]).all() and torch.equal(a[0], b[0])  # loaded = in memory


def test_layouts_that_cannot_be_pruned_are_refused_before_calibration() -> None:
    from obsdiff.models import SD3Adapter
    from obsdiff.oneshot.job import _check_nm_columns, _check_structured
    from obsdiff.pruning.patterns import NM

    with pytest.raises(JobError, match="30 inputs, not divisible by M=8"):
        _check_nm_columns([("blocks.0.odd", torch.nn.Linear(30, 4))], NM(4, 8))
    adapter = SD3Adapter(name="tiny_sd3", tiny="sd3")
    denoiser = adapter.load().transformer
    denoiser.transformer_blocks[1].attn.heads = 3  # 32 channels do not split into 3 heads
    from obsdiff.calibration.packages import list_units

    units = list_units(adapter, denoiser, structured=True)
    with pytest.raises(JobError, match="do not divide into its 3 heads"):
        _check_structured(adapter, denoiser, units, 0.25)


def test_aligned_structured_pruning_leaves_widths_that_are_multiples() -> None:
    """granularity.align=16 on the tiny SD3 (4 heads of 8 channels, FFNs of 128 neurons) at
    30%: every attention keeps an even number of heads and every FFN a multiple of 16 neurons;
    the record says the sparsity it reached."""
    import obsdiff
    from obsdiff.methods import Granularity
    from obsdiff.models.tiny import tiny_sd3_pipeline

    sampling = {"num_inference_steps": 2, "guidance_scale": 4.0, "height": 32, "width": 32}
    granularity = Granularity.from_name("structured", align=16)
    model = obsdiff.prune(
        tiny_sd3_pipeline(), "l1", granularity, 0.3, prompts=["a red circle"], sampling=sampling
    )
    blocks = model.denoiser.transformer_blocks
    heads = [block.attn.to_q.out_features for block in blocks]  # channels
    neurons = [block.ff.net[2].in_features for block in blocks]
    assert all(width % 16 == 0 for width in heads + neurons)
    assert neurons[1] < neurons[0]  # the first block is kept whole
    assert heads == [32] * len(blocks)  # 3 heads of 8 left -> 4 (a tie with 2 keeps more)
    records = model.manifest["records"]
    removed = sum(len(r["removed"]) for r in records)
    assert model.result is not None
    assert model.result.achieved_sparsity == removed / sum(r["before"] for r in records) != 0.3
    with pytest.raises(ValueError, match="applies to granularity=structured only"):
        Granularity.from_name("unstructured", align=16)
