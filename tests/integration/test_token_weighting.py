"""Importance-weighted OBS (`method.token_weighting=cfg_response` or `attention`) on every tiny
family and the toy (from the registries): the maps of the dense pass, where each target
linear's tokens lie, the hook-fed weighted Hessians against their closed form (CFG halves, token
samples, prompt numbers), the attention maps against the softmax they recompute, the prune
with exact sparsity that reloads, `none` as before, and the statistics cache kept apart."""

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
    SHIPPED_MODELS,
    TINY_BY_ADAPTER,
    TINY_MODELS,
    calibration_overrides,
    tiny_adapter,
)

import obsdiff
from obsdiff.app.config import CONF_DIR
from obsdiff.app.settings import build_prune_job
from obsdiff.artifacts.pruned import load_pruned
from obsdiff.calibration import sequential
from obsdiff.calibration.hooks import StatisticsHooks, StepTracker, token_positions
from obsdiff.calibration.importance import empty_conditioning, importance_maps
from obsdiff.calibration.packages import list_units
from obsdiff.calibration.token_maps import (
    AMBIGUOUS,
    IMAGE,
    JOINT,
    TEXT,
    ImportanceMaps,
    token_layout,
    token_weights,
)
from obsdiff.eval.generation import generate
from obsdiff.methods.obs_diff import CFG_RESPONSE, NO_TOKEN_WEIGHTING, TOKEN_WEIGHTINGS
from obsdiff.models.base import ModelAdapter
from obsdiff.models.experts import called_modules
from obsdiff.models.sampling import CFG_DOUBLED_BATCH, CFG_NONE, CFG_SEPARATE_CALLS
from obsdiff.models.tiny import tiny_sd3_pipeline
from obsdiff.oneshot.run import prune_pipeline
from obsdiff.pruning import InputStatistics
from obsdiff.pruning.patterns import num_to_prune
from obsdiff.utils.seeds import image_generators


pytestmark = pytest.mark.integration

PROMPTS = ["a red circle", "a green square", "a blue cat", "two dogs"]
FAST = ["model.sampling.num_inference_steps=2", "packages=2", "calibration.num_prompts=2"]
WEIGHTED = ["method=obsdiff", "method.token_weighting=cfg_response"]
# cfg_response on every model; the other weightings on one model of each family (their maps'
# layouts are each family's) and the toy
PRUNE_CASES = [(model, CFG_RESPONSE) for model in TINY_MODELS + SHIPPED_MODELS] + [
    (model, weighting)
    for weighting in TOKEN_WEIGHTINGS
    if weighting not in (NO_TOKEN_WEIGHTING, CFG_RESPONSE)
    for model in [models[0] for models in TINY_BY_ADAPTER.values()] + SHIPPED_MODELS
]
# the first linear of the groups that read the text stream alone (MMDiT context streams,
# cross-attention keys and values); single-stream blocks read [text, image]
TEXT_STREAM = ("add_q_proj", "to_add_out", "ff_context.", "txt_mlp.", "attn2.to_k")
SINGLE_STREAM = "single_transformer_blocks."


def loaded(name: str, **sampling: object) -> tuple[ModelAdapter, object]:
    adapter = tiny_adapter(name, sampling={"num_inference_steps": 2, **sampling})
    pipe = adapter.load()
    pipe.set_progress_bar_config(disable=True)
    return adapter, pipe


def embed(adapter: ModelAdapter, pipe: object, prompts: list[str], size: int) -> list[dict]:
    return [
        adapter.encode_prompts(pipe, prompts[i : i + size], torch.device("cpu"))
        for i in range(0, len(prompts), size)
    ]


def maps_of(
    adapter: ModelAdapter, pipe: object, embeddings: list[dict], first_prompt: int = 0
) -> ImportanceMaps:
    counts = [next(iter(batch.values())).shape[0] for batch in embeddings]
    empty = empty_conditioning(adapter, pipe, counts) if adapter.cfg_mode() == CFG_NONE else None
    steps = adapter.denoising_steps(pipe)
    return importance_maps(pipe, adapter, embeddings, steps, 0, first_prompt, empty)


def target_groups(adapter: ModelAdapter, denoiser: torch.nn.Module) -> list[tuple[str, object]]:
    return [
        (name := f"{unit.block_name}.{group[0]}", denoiser.get_submodule(name))
        for unit in list_units(adapter, denoiser)
        for group in unit.groups
    ]


@pytest.mark.parametrize("model", TINY_MODELS + SHIPPED_MODELS)
def test_every_target_linear_reads_its_tokens_where_the_map_says(model: str) -> None:
    """The dense pass gives one map a step at the token grid; each target linear's tokens are
    the image grid (a UNet's at its level), [text, image] (single-stream blocks) or the text,
    as its name says, and its weights have mean 1 a sample."""
    adapter, pipe = loaded(model)
    denoiser = adapter.denoiser(pipe)
    maps = maps_of(adapter, pipe, embed(adapter, pipe, PROMPTS[:2], 2))
    grid = tuple(maps.by_step[0].shape[1:])
    assert len(maps.by_step) == adapter.denoising_steps(pipe)
    for step_maps in maps.by_step:
        assert step_maps.shape == (2, *grid)
        torch.testing.assert_close(step_maps.flatten(1).mean(1), torch.ones(2))
        assert float(step_maps.std()) > 0.01  # a response, not uniform
    tracker = StepTracker()
    groups = target_groups(adapter, denoiser)
    stats = [(module, InputStatistics(module.in_features, moments=False)) for _, module in groups]
    steps = adapter.denoising_steps(pipe)
    hooks = StatisticsHooks(
        denoiser, stats, torch.ones(steps), tracker, adapter.cfg_mode(), importance=maps
    )
    seen: dict[str, tuple[str, torch.Tensor | None]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            tokens = args[0].shape[1:-1].numel()
            kind, _ = token_layout(grid, tokens, hooks.text_tokens)
            seen.setdefault(name, (kind, hooks.row_weights(args[0], tracker.step)))

        return hook

    handles = [module.register_forward_pre_hook(record(name)) for name, module in groups]
    embeddings = embed(adapter, pipe, PROMPTS[:2], 2)
    with hooks.attached(), torch.inference_mode():
        tracker.reset()
        hooks.batch(0, 2)
        adapter.calibration_call(
            pipe, embeddings[0], image_generators(0, 0, 2), tracker.on_step_end
        )
    for handle in handles:
        handle.remove()
    assert seen.keys() == {name for name, _ in groups}
    for name, (kind, weights) in seen.items():
        if any(marker in name for marker in TEXT_STREAM):
            assert kind in (TEXT, AMBIGUOUS) and weights is None, name
        else:
            assert kind == (JOINT if SINGLE_STREAM in name else IMAGE), name
            assert weights is not None, name
            torch.testing.assert_close(weights.mean(1), torch.ones(weights.shape[0]))


CLOSED_FORM_MODELS = {  # one a CFG mode, and a UNet (its levels)
    "tiny_sd3": CFG_DOUBLED_BATCH,
    "tiny_wan": CFG_SEPARATE_CALLS,
    "tiny_flux2": CFG_NONE,
    "tiny_sd21": CFG_DOUBLED_BATCH,
}


@pytest.mark.parametrize("model", sorted(CLOSED_FORM_MODELS))
@pytest.mark.parametrize(("include_uncond", "max_tokens"), [(True, None), (False, 40)])
def test_hooked_weighted_statistics_equal_the_closed_form(
    model: str, include_uncond: bool, max_tokens: int | None
) -> None:
    """Each row x_i of a call weighs w_i of its prompt's map at the call's step, both CFG halves
    alike; a token sample keeps the weights of its tokens; the batch's prompts are found by
    their numbers (here prompts 3 and 4 of a shard starting at 3)."""
    adapter, pipe = loaded(model)
    assert adapter.cfg_mode() == CLOSED_FORM_MODELS[model]
    denoiser = adapter.denoiser(pipe)
    embeddings = embed(adapter, pipe, PROMPTS[:2], 2)
    maps = maps_of(adapter, pipe, embeddings, first_prompt=3)
    name, layer = target_groups(adapter, denoiser)[0]
    steps = adapter.denoising_steps(pipe)
    alphas = torch.linspace(1.2, 0.8, steps, dtype=torch.float64)
    tracker = StepTracker()
    stats = InputStatistics(layer.in_features, moments=False)
    hooks = StatisticsHooks(
        denoiser, [(layer, stats)], alphas, tracker, adapter.cfg_mode(), include_uncond,
        max_tokens=max_tokens, seed=5, importance=maps,
    )  # fmt: skip
    seen: list[tuple[int, int, int, torch.Tensor]] = []
    handle = layer.register_forward_pre_hook(
        lambda module, args: seen.append(
            (tracker.step, tracker.call_in_step, hooks.calls, args[0].detach().clone())
        )
    )
    with hooks.attached(), torch.inference_mode():
        tracker.reset()
        hooks.batch(3, 2)
        generators = image_generators(0, 3, 2)
        adapter.calibration_call(pipe, embeddings[0], generators, tracker.on_step_end)
    handle.remove()

    xtx = torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64)
    samples = 0.0
    for step, call, number, x in seen:
        if not include_uncond:
            if adapter.cfg_mode() == CFG_DOUBLED_BATCH:
                x = x[x.shape[0] // 2 :]
            elif call > 1:
                continue
        weights = token_weights(maps.batch(3, 2, step), x.shape[1], None)  # an image stream
        assert weights is not None, name
        weights = weights.repeat(x.shape[0] // 2, 1)  # both CFG halves of a prompt alike
        scale = 1.0
        if max_tokens is not None:
            kept, scale = token_positions(x, max_tokens, 5, number)
            assert kept is not None
            x, weights = x[:, kept], weights[:, kept]
        rows = x.reshape(-1, layer.in_features).double() * weights.reshape(-1, 1).double().sqrt()
        xtx += float(alphas[step]) * scale * rows.T @ rows
        samples += float(alphas[step]) * x.shape[0]
    torch.testing.assert_close(
        stats.hessian_matrix().double(), 2 * xtx / samples, rtol=1e-4, atol=1e-4
    )


def test_a_shard_computes_the_maps_of_its_own_prompts() -> None:
    """Data-parallel ranks compute the maps of their shards: prompt i's maps are the same
    whoever computes them (image i from seed + i)."""
    adapter, pipe = loaded("tiny_sd3")
    whole = maps_of(adapter, pipe, embed(adapter, pipe, PROMPTS, 2))
    shard = maps_of(adapter, pipe, embed(adapter, pipe, PROMPTS[2:], 2), first_prompt=2)
    for step in range(len(whole.by_step)):
        assert torch.equal(whole.batch(2, 2, step), shard.batch(2, 2, step))
        assert not torch.equal(whole.batch(0, 2, step), shard.batch(2, 2, step))


@pytest.mark.parametrize(
    ("model", "sampling"),
    [
        ("tiny_flux", {"true_cfg_scale": None, "negative_prompt": None}),  # distilled guidance
        ("tiny_sd3", {"guidance_scale": 1.0}),  # CFG off
    ],
)
def test_a_sampling_without_cfg_takes_the_empty_prompts_branch(
    model: str, sampling: dict[str, object]
) -> None:
    adapter, pipe = loaded(model, **sampling)
    assert adapter.cfg_mode() == CFG_NONE
    embeddings = embed(adapter, pipe, PROMPTS[:2], 2)
    empty = empty_conditioning(adapter, pipe, [2])
    calls = []
    handles = [
        module.register_forward_pre_hook(lambda module, args: calls.append(1))
        for module in called_modules(adapter.denoiser(pipe))
    ]
    steps = adapter.denoising_steps(pipe)
    maps = importance_maps(pipe, adapter, embeddings, steps, 0, 0, empty)
    for handle in handles:
        handle.remove()
    assert len(calls) == 2 * steps  # each conditional call, then the empty prompt's
    assert all(float(m.std()) > 0.01 for m in maps.by_step)


@pytest.fixture
def compose_prune() -> Iterator[Callable[..., DictConfig]]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield lambda *overrides: compose(
            config_name="prune", overrides=["calibration=tiny", *FAST, *overrides]
        )


def target_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    saved = safetensors.torch.load_file(str(run_dir / "denoiser.safetensors"))
    return {layer["name"]: saved[layer["name"] + ".weight"] for layer in manifest["records"]}


@pytest.mark.parametrize(("model", "weighting"), PRUNE_CASES)
def test_each_weighting_prunes_exactly_and_reloads(
    model: str, weighting: str, compose_prune, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    weighted = ["method=obsdiff", f"method.token_weighting={weighting}"]
    overrides = [f"model={model}", *weighted, *calibration_overrides(model)]
    pruned = prune_pipeline(build_prune_job(compose_prune(*overrides)), tmp_path)
    result = pruned.result
    assert result is not None and result.target_parameters is not None
    weights = target_weights(tmp_path)
    expected = sum(num_to_prune(w.numel(), 0.5) for w in weights.values())
    assert sum(int((w == 0).sum()) for w in weights.values()) == expected
    assert result.achieved_sparsity == pytest.approx(expected / result.target_parameters)
    reloaded = load_pruned(tmp_path)
    assert reloaded.manifest["method"]["token_weighting"] == weighting  # and its run key
    unweighted = [o for o in overrides if "token_weighting" not in o]
    assert reloaded.manifest["run_key"] != build_prune_job(compose_prune(*unweighted)).run_key
    a = generate(
        pruned.pipeline, reloaded.adapter, ["a cat"], seed=1, batch_size=1, output_type="latent"
    )
    b = generate(
        reloaded.pipeline, reloaded.adapter, ["a cat"], seed=1, batch_size=1, output_type="latent"
    )
    assert torch.equal(a[0], b[0])


def test_none_runs_no_pass_and_unit_weights_give_its_bits(
    compose_prune, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """`none` (the default) never computes maps; maps of ones, weighting every row 1, give
    exactly its pruned weights; the CFG response gives others."""
    real = sequential.importance_maps
    used: list[ImportanceMaps] = []

    def tracked(*args, **kwargs) -> ImportanceMaps:  # type: ignore[no-untyped-def]
        used.append(real(*args, **kwargs))
        return used[-1]

    monkeypatch.setattr(sequential, "importance_maps", tracked)
    prune_pipeline(build_prune_job(compose_prune()), tmp_path / "none")
    assert used == []
    prune_pipeline(build_prune_job(compose_prune(*WEIGHTED)), tmp_path / "weighted")
    assert len(used) == 1
    maps = used[0]
    ones = ImportanceMaps([torch.ones_like(m) for m in maps.by_step], maps.first_prompt)
    monkeypatch.setattr(sequential, "importance_maps", lambda *args, **kwargs: ones)
    prune_pipeline(build_prune_job(compose_prune(*WEIGHTED)), tmp_path / "ones")
    none, unit = target_weights(tmp_path / "none"), target_weights(tmp_path / "ones")
    weighted = target_weights(tmp_path / "weighted")
    assert all(torch.equal(none[name], unit[name]) for name in none)
    assert any(not torch.equal(none[name], weighted[name]) for name in none)


def test_weighted_statistics_differ_and_are_never_served_to_unweighted_runs(
    compose_prune, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    passes: list[int] = []
    real = sequential.StatisticsHooks

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        passes.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sequential, "StatisticsHooks", counting)
    cache = tmp_path / "cache"
    settings = ["packages=1", f"statistics_cache={cache}"]
    prune_pipeline(build_prune_job(compose_prune(*settings)), tmp_path / "a")
    prune_pipeline(build_prune_job(compose_prune(*settings, *WEIGHTED)), tmp_path / "b")
    assert len(passes) == 2  # the weighted run calibrated: the unweighted entry is not its
    entries = sorted(cache.glob("*.safetensors"), key=lambda path: path.stat().st_mtime)
    assert len(entries) == 2
    plain, weighted = (safetensors.torch.load_file(str(path)) for path in entries)
    for key in [key for key in plain if key.endswith("/xtx")]:  # the text stream: uniform
        text = any(marker in key for marker in TEXT_STREAM)
        assert torch.equal(plain[key], weighted[key]) == text, key
    for key in plain:  # Wanda's and DSnoT's moments are not weighted
        if key.endswith(("/column_sum", "/column_sq_sum", "/variance_sum", "/counts")):
            assert torch.equal(plain[key], weighted[key]), key
    passes.clear()
    monkeypatch.setattr(sequential, "importance_maps", lambda *a, **k: pytest.fail("maps made"))
    prune_pipeline(build_prune_job(compose_prune(*settings, *WEIGHTED)), tmp_path / "c")
    assert passes == []  # a weighted run reuses the weighted entry, and needs no maps


def test_a_resume_computes_the_maps_on_the_restored_model_and_says_so(
    compose_prune, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:  # type: ignore[no-untyped-def]
    """The dense model is gone once packages are pruned: a resume weights its remaining
    packages by maps of the model as restored, with a warning."""
    real = sequential.build_package
    calls = {"n": 0}

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure in package 2")
        return real(*args, **kwargs)

    monkeypatch.setattr(sequential, "build_package", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        prune_pipeline(build_prune_job(compose_prune(*WEIGHTED)), tmp_path)
    monkeypatch.setattr(sequential, "build_package", real)
    with caplog.at_level("WARNING", logger="obsdiff.calibration.sequential"):
        result = prune_pipeline(build_prune_job(compose_prune(*WEIGHTED)), tmp_path).result
    assert result is not None and result.achieved_sparsity == pytest.approx(0.5, abs=1e-3)
    assert "resuming at package 2 with method.token_weighting=cfg_response" in caplog.text


def test_a_method_without_a_hessian_is_refused_before_loading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ModelAdapter, "load", lambda self: pytest.fail("the model was loaded"))
    message = "method 'wanda' has no option 'token_weighting'; it is an option of method=obsdiff"
    with pytest.raises(ValueError, match=message):
        obsdiff.prune(tiny_sd3_pipeline(), "wanda", prompts=["a"], token_weighting="cfg_response")


def test_attention_maps_are_the_attention_each_image_position_receives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the tiny SD3 (joint attention of [image, text] keys): the maps of a step are the mean
    over the calls' joint attention layers of the attention each image position receives,
    recomputed here from the layers' queries and keys; the wrapped attention function is put
    back after the pass, and the sampling it served is unchanged."""
    import torch.nn.functional as F

    from obsdiff.calibration.importance import attention_received

    adapter, pipe = loaded("tiny_sd3")
    batches = embed(adapter, pipe, PROMPTS[:2], 2)
    original = F.scaled_dot_product_attention
    seen: list[torch.Tensor] = []

    def spy(query, key, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(attention_received(query.double(), key.double()))  # (2B, image + text)
        return original(query, key, *args, **kwargs)

    before = generate(pipe, adapter, PROMPTS[:1], seed=0, batch_size=1, output_type="latent")
    maps = importance_maps(pipe, adapter, batches, 2, seed=0, kind="attention")
    assert F.scaled_dot_product_attention is original
    after = generate(pipe, adapter, PROMPTS[:1], seed=0, batch_size=1, output_type="latent")
    assert torch.equal(before[0], after[0])
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    tracker = StepTracker()
    calls = len(adapter.denoiser(pipe).transformer_blocks)
    adapter.calibration_call(pipe, batches[0], image_generators(0, 0, 2), tracker.on_step_end)
    grid = tuple(maps.by_step[0].shape[1:])
    positions = grid[0] * grid[1]
    for step in range(2):
        layers = seen[step * calls : (step + 1) * calls]
        expected = torch.zeros(2, positions, dtype=torch.float64)
        for received in layers:
            image = received[2:, :positions]  # the conditional half; [image, text] keys
            expected += image / image.mean(1, keepdim=True)
        expected /= calls
        found = maps.by_step[step].flatten(1).double()
        torch.testing.assert_close(
            found, expected / expected.mean(1, keepdim=True), rtol=1e-4, atol=1e-5
        )


def test_attention_received_is_the_softmax_it_recomputes() -> None:
    """In float64 against softmax(q k^T / sqrt(d) + mask) formed whole: chunks of queries,
    grouped keys, boolean and additive masks."""
    from obsdiff.calibration.importance import attention_received

    torch.manual_seed(0)
    query = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    key = torch.randn(2, 2, 5, 8, dtype=torch.float64)  # 2 key heads for 4 query heads
    keep = torch.rand(2, 1, 7, 5) > 0.3
    keep[..., 0] = True
    for mask in (None, keep, torch.randn(2, 1, 7, 5, dtype=torch.float64)):
        full = query @ key.repeat_interleave(2, 1).transpose(-1, -2) / 8**0.5
        if mask is not None:
            full = (
                full.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else full + mask
            )
        expected = full.softmax(-1).mean(1).mean(1)  # (B, Lk)
        found = attention_received(query, key, mask, chunk=3)
        torch.testing.assert_close(found, expected.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(found.sum(1), torch.ones(2), rtol=1e-5, atol=1e-6)


def test_a_family_whose_attention_maps_cannot_be_read_is_refused_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app_runner import TINY_PRUNE, run_in_process

    from obsdiff.models import SD3Adapter

    monkeypatch.setattr(SD3Adapter, "joint_attention", None)
    result = run_in_process(
        "obsdiff.prune", *TINY_PRUNE, "method.token_weighting=attention",
        f"paths.output_root={tmp_path}",
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert output.count("[ERROR]") == 1
    assert "attention maps of model=tiny_sd3 (sd3) cannot be read" in output
    assert "use method.token_weighting=cfg_response" in output
    assert "loaded model" not in output and not any(tmp_path.iterdir())
