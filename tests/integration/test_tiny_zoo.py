"""Every tiny pipeline: built in code, samples with CFG, round-trips through the real loader."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.normalization import RMSNorm
from PIL import Image
from registry import REAL_MODELS, TINY_MODELS, adapter_class, tiny_adapter

from obsdiff.api import model_from_config
from obsdiff.calibration.hooks import StepTracker
from obsdiff.eval.generation import render
from obsdiff.models import (
    ADAPTERS,
    FluxAdapter,
    ModelAdapter,
    ModelLoadError,
    SD3Adapter,
)
from obsdiff.models.experts import called_modules
from obsdiff.models.sampling import CFG_DOUBLED_BATCH, CFG_NONE, CFG_SEPARATE_CALLS
from obsdiff.utils.memory import is_allocator_aligned
from obsdiff.utils.seeds import image_generators


pytestmark = pytest.mark.integration

PROMPTS = ["a red circle on a blue background", "a green square"]
SAMPLING = {"num_inference_steps": 2, "height": 64, "width": 64}
PARAMETER_BUDGET = 500_000  # "a few hundred thousand parameters at most", whole pipeline

# every tiny model config (conf/model/), and SD3 without its T5 encoder
ZOO = [*TINY_MODELS, "tiny_sd3_no_t5"]


def make_adapter(name: str, **overrides: Any) -> ModelAdapter:
    """The zoo member's adapter at `SAMPLING` (true CFG where the family has it)."""
    if name == "tiny_sd3_no_t5":
        name, overrides = "tiny_sd3", {"with_t5": False, **overrides}
    return tiny_adapter(name, sampling=SAMPLING, **overrides)


def latents(pipe: DiffusionPipeline, adapter: ModelAdapter, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        out = pipe(
            prompt=PROMPTS, generator=generator, output_type="latent", **adapter.call_kwargs()
        )
    return adapter.outputs(out)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(params=sorted(ZOO))
def zoo_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_build_is_small_deterministic_and_in_eval_mode(zoo_name: str) -> None:
    pipe = make_adapter(zoo_name).load()
    modules = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    assert all(not m.training for mod in modules.values() for m in mod.modules())
    assert sum(n_params(m) for m in modules.values()) <= PARAMETER_BUDGET

    again = make_adapter(zoo_name).load()
    other_seed = make_adapter(zoo_name, seed=1).load()
    for key, module in modules.items():
        state, state_again = module.state_dict(), again.components[key].state_dict()
        assert all(torch.equal(state[k], state_again[k]) for k in state)
    denoiser = make_adapter(zoo_name).denoiser(pipe)
    other = make_adapter(zoo_name).denoiser(other_seed)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(denoiser.parameters(), other.parameters(), strict=True)
    )


def linear_names(denoiser: torch.nn.Module) -> set[str]:
    """The denoiser's linears by name, every index (block, level, list position) as `*`."""
    return {
        re.sub(r"\.\d+(?=\.|$)", ".*", name)
        for name, module in denoiser.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


@pytest.mark.parametrize("real", REAL_MODELS)
def test_a_tiny_model_has_the_linears_of_each_real_one(real: str) -> None:
    """Pruning reaches the tiny model's linears by the names the real model has: some tiny recipe
    of the real model's family has exactly its linears (built from its shipped architecture)."""
    expected = linear_names(model_from_config(real).denoiser_skeleton())
    cls = adapter_class(real)
    found = {
        recipe: linear_names(cls(name=recipe, tiny=recipe).denoiser_skeleton())
        for recipe in cls.tiny_variants
    }
    assert expected in found.values(), {n: expected ^ names for n, names in found.items()}


def test_sd3_structure_matches_the_real_model() -> None:
    transformer = make_adapter("tiny_sd3").load().transformer
    blocks = transformer.transformer_blocks
    assert [b.context_pre_only for b in blocks] == [False, False, False, True]
    last = blocks[-1]
    assert last.attn.to_add_out is None and last.ff_context is None
    names = {n for n, m in blocks[0].named_modules() if isinstance(m, torch.nn.Linear)}
    assert {
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
        "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear",
    } <= names  # fmt: skip
    assert transformer.config.num_attention_heads >= 2
    assert all(b.attn2 is None for b in blocks)


def test_sd35_has_qk_norm_and_dual_attention() -> None:
    blocks = make_adapter("tiny_sd35").load().transformer.transformer_blocks
    assert [b.attn2 is not None for b in blocks] == [True, True, False, False]
    assert all(isinstance(b.attn.norm_q, RMSNorm) for b in blocks)
    assert isinstance(blocks[0].attn2.norm_k, RMSNorm)
    assert blocks[-1].context_pre_only


def test_flux_has_double_single_blocks_and_guidance_embedding() -> None:
    transformer = make_adapter("tiny_flux").load().transformer
    assert len(transformer.transformer_blocks) == 2
    assert len(transformer.single_transformer_blocks) == 2
    assert transformer.config.guidance_embeds
    assert hasattr(transformer.time_text_embed, "guidance_embedder")
    single = {n for n, m in transformer.single_transformer_blocks[0].named_modules()}
    assert {"proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v"} <= single
    schnell = FluxAdapter(name="s", tiny="schnell").load().transformer
    assert not schnell.config.guidance_embeds


def test_sdxl_has_text_time_linear_projections_and_geglu() -> None:
    unet = make_adapter("tiny_sdxl").load().unet
    assert unet.config.addition_embed_type == "text_time"
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert len(blocks) >= 4
    assert all(type(b.ff.net[0]).__name__ == "GEGLU" for b in blocks)
    projections = [m.proj_in for m in unet.modules() if hasattr(m, "proj_in")]
    assert projections and all(isinstance(p, torch.nn.Linear) for p in projections)


@pytest.mark.parametrize(("name", "projection"), [("tiny_sd21", "Linear"), ("tiny_sd15", "Conv2d")])
def test_sd15_and_sd21_differ_in_their_projections_only(name: str, projection: str) -> None:
    """One CLIP encoder, no added conditioning, PNDM; SD 2.1 projects with linears, SD 1.5 with
    1x1 convolutions (not pruned); the pruned linears and head groups are SDXL's."""
    adapter = make_adapter(name)
    pipe = adapter.load()
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.safety_checker is None
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    unet = pipe.unet
    assert unet.config.addition_embed_type is None
    projections = [m.proj_in for m in unet.modules() if hasattr(m, "proj_in")]
    assert projections and all(type(p).__name__ == projection for p in projections)
    blocks = adapter.blocks(unet)
    assert len(blocks) == 11 and all(type(b.ff.net[0]).__name__ == "GEGLU" for _, b in blocks)
    units = adapter.block_units(blocks[0][1])
    assert units[2] == (("attn2.to_q",), ("attn2.to_k", "attn2.to_v"))  # image stream, text
    heads, neurons = adapter.structured_groups(blocks[0][1])
    assert [g.attention for g in heads] == ["attn1", "attn2"] and len(neurons) == 1

    # PNDM (PLMS) takes one step more than asked: calibration weights each step on its own
    steps = adapter.denoising_steps(pipe)
    assert steps == adapter.sampling.num_inference_steps + 1
    tracker, seen = StepTracker(), []
    handle = unet.register_forward_pre_hook(lambda module, args: seen.append(tracker.step))
    embeddings = adapter.encode_prompts(pipe, ["a red circle"], torch.device("cpu"))
    with torch.inference_mode():
        adapter.calibration_call(pipe, embeddings, image_generators(0, 0, 1), tracker.on_step_end)
    handle.remove()
    assert seen == list(range(steps))  # the step index of each call: a weight of its own


def test_pixart_is_a_cross_attention_dit() -> None:
    """Self-attention, cross-attention to T5 (q from the image tokens, k/v from the text: two
    input groups, two Hessians), a GELU FFN; adaLN-single and the caption projection kept out."""
    adapter = make_adapter("tiny_pixart")
    transformer = adapter.load().transformer
    assert transformer.config.norm_type == "ada_norm_single"
    blocks = adapter.blocks(transformer)
    assert len(blocks) == 2
    block = blocks[0][1]
    assert type(block.ff.net[0]).__name__ == "GELU"
    units = adapter.block_units(block)
    assert units[2] == (("attn2.to_q",), ("attn2.to_k", "attn2.to_v"))
    targets = {n for unit in units for group in unit for n in group}
    assert not any("adaln" in n or "scale_shift" in n or "caption" in n for n in targets)
    assert block.attn2.to_k.in_features == transformer.config.cross_attention_dim
    heads, neurons = adapter.structured_groups(block)
    assert [g.attention for g in heads] == ["attn1", "attn2"]
    assert len(neurons) == 1 and len(neurons[0].producers) == 1  # not gated


def test_generation_with_cfg_latent_and_pil(zoo_name: str) -> None:
    """CFG as the family runs it (a doubled batch, a second call, or none where guidance is
    embedded: FLUX.2), the final latents in the prediction's layout, PIL images."""
    adapter = make_adapter(zoo_name)
    assert adapter.uses_cfg() or adapter.cfg_mode() == CFG_NONE
    pipe = adapter.load()
    seen: list[int] = []

    def count_call(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else kwargs.get("sample"))
        seen.append(hidden.shape[0])

    called = called_modules(adapter.denoiser(pipe))  # each timestep expert, in step order
    handles = [c.register_forward_pre_hook(count_call, with_kwargs=True) for c in called]
    try:
        out = latents(pipe, adapter)
    finally:
        for handle in handles:
            handle.remove()
    calls_per_step, batch_per_call = {  # conditional and unconditional calls
        CFG_SEPARATE_CALLS: (2, len(PROMPTS)),
        CFG_DOUBLED_BATCH: (1, 2 * len(PROMPTS)),
        CFG_NONE: (1, len(PROMPTS)),
    }[adapter.cfg_mode()]
    steps = adapter.denoising_steps(pipe)  # PNDM (PLMS) repeats its second timestep
    assert seen == [batch_per_call] * (calls_per_step * steps)
    components = dict(pipe.components)  # in the prediction's layout (packed: Flux's)
    latent = torch.empty(2, *adapter.latent_shape(components))
    expected = tuple(adapter.as_prediction(latent).shape)
    assert tuple(out.shape) == expected
    assert torch.isfinite(out).all()
    assert not torch.equal(out[0], out[1])

    final: list[torch.Tensor] = []  # the adapter's step callback hands over the last latents
    again = render(pipe, adapter, PROMPTS, [0, 1], 0, output_type="latent", final_latents=final)
    assert all(torch.equal(a, b) for a, b in zip(final, again, strict=True))

    generator = torch.Generator().manual_seed(0)
    call = adapter.call_kwargs()
    images = adapter.outputs(pipe(prompt=PROMPTS, generator=generator, output_type="pil", **call))
    assert len(images) == 2
    frames = [f for video in images for f in video] if adapter.video else images
    if adapter.video:  # each prompt's video as its frames
        assert all(len(video) == adapter.sampling.num_frames for video in images)
    assert all(isinstance(im, Image.Image) and im.size == (64, 64) for im in frames)


def test_save_load_round_trip_is_bit_identical(zoo_name: str, tmp_path: Path) -> None:
    """Bit-identical on any CPU because the loader copies the file-mapped weights into allocator
    memory (obsdiff.utils.memory): CPU kernels pick their path by operand alignment, and the
    mapped tensors are only 4-byte aligned. Without the copy the latents differed by up to 1e-4
    on an AMD EPYC with AVX-512; the alignment check below fails on every CPU without it."""
    tiny = make_adapter(zoo_name)
    pipe = tiny.load()
    reference = latents(pipe, tiny, seed=3)
    pipe.save_pretrained(tmp_path)
    assert not list(tmp_path.rglob("*.bin")) and list(tmp_path.rglob("*.safetensors"))

    real_path = make_adapter(zoo_name, tiny=None, pretrained=str(tmp_path))
    loaded = real_path.load()
    assert type(loaded) is type(pipe)
    modules = [m for m in loaded.components.values() if isinstance(m, torch.nn.Module)]
    assert all(is_allocator_aligned(m) for m in modules)
    t5 = getattr(loaded, "text_encoder_3", None) or getattr(loaded, "text_encoder_2", None)
    if type(t5).__name__ == "T5EncoderModel":  # tied embeddings stay tied after the copy
        assert t5.shared.weight is t5.encoder.embed_tokens.weight
    assert torch.equal(latents(loaded, real_path, seed=3), reference)


def test_bfloat16_dtype_is_applied() -> None:
    pipe = make_adapter("tiny_sd3", dtype="bfloat16").load()
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("cls", ADAPTERS)
def test_unreachable_hub_id_gives_one_clear_error(cls: type[ModelAdapter]) -> None:
    adapter = cls(name="sd3_medium", pretrained="obsdiff-tests/no-such-model")
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        adapter.load()
    assert time.perf_counter() - started < 30
    message = str(info.value)
    assert "obsdiff-tests/no-such-model" in message
    assert "model.pretrained=<folder>" in message and "conf/model/sd3_medium.yaml" in message
    assert isinstance(info.value.__cause__, OSError)


def test_pipeline_of_another_family_is_refused(tmp_path: Path) -> None:
    make_adapter("tiny_flux").load().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="holds a FluxPipeline.*sd3 adapter"):
        SD3Adapter(name="sd3_medium", pretrained=str(tmp_path)).load()
