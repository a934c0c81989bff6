"""FLUX.2 family: `Flux2Transformer2DModel` (double- and single-stream blocks with fused
projections) in a `Flux2Pipeline`.

FLUX.2-dev has 8 double-stream blocks (SD3's joint attention with `to_q/k/v`, `add_*_proj`,
`to_out.0`, `to_add_out`, and a SwiGLU FFN per stream: `ff.linear_in` holds the gate rows, then
the up rows; `ff.linear_out`) and 48 single-stream blocks over the concatenated [text, image]
tokens, whose attention and MLP input projections are one linear, `attn.to_qkv_mlp_proj`
(rows [q | k | v | gate | up]), and whose outputs are one linear, `attn.to_out` (columns
[attention | MLP]). No linear has a bias. The modulation is shared at model level
(`double_stream_modulation_img/txt`, `single_stream_modulation`: 2% of the model), so low-rank
modulation has little to take.

Unstructured and N:M pruning treat each fused linear as one layer (one Hessian over its input).
Structured pruning slices them consistently: a head owns its rows in each of the q, k and v
slices of `to_qkv_mlp_proj` and its columns of `to_out`; an MLP neuron its gate and up rows and
its column of `to_out` after the attention's; the attention's `inner_dim` and `mlp_hidden_dim`,
by which the block splits its fused output, follow. For DSnoT's `skip_mlp` the fused linears
count as attention. The model is guidance-distilled: `guidance_scale` is embedded and each step
is one conditional call (no negative prompt). Kept out of pruning: the modulation, the timestep
and guidance embedders, `x_embedder`, `context_embedder`, `norm_out`, `proj_out` and the
Mistral-3 text encoder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from obsdiff.models.base import ModelAdapter, component_config, pack_2x2
from obsdiff.models.loading import ModelConfigError
from obsdiff.models.sampling import SamplingDefaults
from obsdiff.models.structure import (
    MMDIT_UNITS,
    HeadGroup,
    InputNames,
    NeuronGroup,
    Unit,
    ffn_group,
    head_group,
    linear_at,
    units_of,
)


if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


# Flux2TransformerBlock: joint attention over both streams, a SwiGLU FFN per stream
DOUBLE_UNITS: list[list[InputNames]] = [
    *MMDIT_UNITS[:2],  # the joint attention's
    [("ff.linear_in",), ("ff_context.linear_in",)],
    [("ff.linear_out",), ("ff_context.linear_out",)],
]
# Flux2SingleTransformerBlock: one fused input projection, one fused output projection
FUSED_IN, FUSED_OUT = "attn.to_qkv_mlp_proj", "attn.to_out"
SINGLE_UNITS: list[list[InputNames]] = [[(FUSED_IN,)], [(FUSED_OUT,)]]


class Flux2Adapter(ModelAdapter):
    family = "flux2"
    pipeline_classes = ("Flux2Pipeline",)
    denoiser_attr = "transformer"
    tiny_variants = ("dev",)
    takes_max_sequence_length = True
    ffn_modules = ("ff", "ff_context")
    timestep_divisor = 1000.0  # Flux2Pipeline passes t / 1000
    modulation_patterns = (
        "double_stream_modulation_img.linear",
        "double_stream_modulation_txt.linear",
        "single_stream_modulation.linear",
        "norm_out.linear",
    )
    keep_out = {
        "embedders": ("x_embedder", "pos_embed", "time_guidance_embed", "context_embedder"),
        "final projection": ("proj_out",),
    }
    depth_lists = {
        "transformer_blocks": "num_layers",
        "single_transformer_blocks": "num_single_layers",
    }
    joint_blocks = True  # double blocks; the single ones take and return the joined tokens

    def build_tiny(self, variant: str, seed: int) -> DiffusionPipeline:
        from obsdiff.models import tiny  # diffusers and transformers, for the zoo only

        return tiny.tiny_flux2_pipeline(seed=seed)

    def block_units(self, block: nn.Module) -> list[Unit]:
        return units_of(block, SINGLE_UNITS if is_single(block) else DOUBLE_UNITS)

    def structured_groups(self, block: nn.Module) -> tuple[list[HeadGroup], list[NeuronGroup]]:
        """Double blocks: the joint heads and both SwiGLU FFNs' neurons (gate and up rows
        together). Single blocks: the packed slices of the fused projections
        (`packed_groups`)."""
        if is_single(block):
            return packed_groups(block)
        producers = [name for group in DOUBLE_UNITS[0] for name in group]
        heads = head_group(block, "attn", producers, ["attn.to_out.0", "attn.to_add_out"])
        neurons = ffn_group(block, "ff.linear_in", "ff.linear_out", gated=True)
        neurons += ffn_group(block, "ff_context.linear_in", "ff_context.linear_out", gated=True)
        return heads, neurons

    def check_structured(self, block_name: str, block: nn.Module) -> None:
        """A single block's fused projections must hold exactly the packed layout the groups
        slice ([q | k | v | gate | up] rows, [attention | MLP] columns)."""
        if is_single(block):
            packed_layout(block_name, block)

    def block_streams(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A single block's one stream (the joined tokens), or a double block's two."""
        if isinstance(output, torch.Tensor):
            return [(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0], output)]
        return super().block_streams(args, kwargs, output)

    def skipped_output(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A single block (called without `encoder_hidden_states`) returns its input alone."""
        if kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None) is None:
            return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return super().skipped_output(args, kwargs)

    def uses_cfg(self, sampling: SamplingDefaults | None = None) -> bool:
        """Never: `guidance_scale` is embedded (guidance distillation), one call per step."""
        return False

    def call_kwargs(self, sampling: SamplingDefaults | None = None) -> dict[str, Any]:
        """As the base, without a negative prompt (Flux2Pipeline takes none)."""
        kwargs = super().call_kwargs(sampling)
        kwargs.pop("negative_prompt", None)
        return kwargs

    def as_prediction(self, target: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h/2 * w/2, 4C): Flux2Pipeline's `_patchify_latents` then
        `_pack_latents` (the same token and channel order as Flux's packing)."""
        return pack_2x2(target)

    def encode_latents(self, vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The posterior's mode normalised as the pipeline does: by the VAE's BatchNorm
        statistics over the 2 x 2-patchified channels (no scaling or shift factor)."""
        config: Any = getattr(vae, "config")  # noqa: B009 - nn.Module types it as a Module
        encoded = vae.encode(images).latent_dist.mode()  # type: ignore[operator]  # (B, C, h, w)
        b, c, h, w = encoded.shape
        patches = encoded.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        patches = patches.reshape(b, 4 * c, h // 2, w // 2)  # channel c * 4 + dy * 2 + dx
        bn: Any = getattr(vae, "bn")  # noqa: B009
        mean = bn.running_mean.view(1, -1, 1, 1).to(patches.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + config.batch_norm_eps).to(patches.dtype)
        normalised = (patches - mean) / std
        unpatched = normalised.view(b, c, 2, 2, h // 2, w // 2).permute(0, 1, 4, 2, 5, 3)
        return unpatched.reshape(b, c, h, w)

    def example_call(
        self, prompts: int, components: dict[str, nn.Module], device: str | torch.device = "meta"
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Packed latents with their (t, h, w, l) ids, `max_sequence_length` Mistral tokens (three
        layers stacked) with theirs, the embedded guidance; one call per step."""
        config = component_config(components, self.denoiser_attr)
        tokens = self.sampling.max_sequence_length or 512
        height, width = self.latent_size(components)
        patches = (height // 2) * (width // 2)
        dtype = self.torch_dtype
        return (), {
            "hidden_states": torch.empty(prompts, patches, config.in_channels, dtype=dtype,
                                         device=device),
            "timestep": torch.empty(prompts, dtype=dtype, device=device),
            "guidance": torch.empty(prompts, device=device),
            "encoder_hidden_states": torch.empty(prompts, tokens, config.joint_attention_dim,
                                                 dtype=dtype, device=device),
            "txt_ids": torch.empty(prompts, tokens, 4, dtype=torch.int64, device=device),
            "img_ids": torch.empty(prompts, patches, 4, dtype=torch.int64, device=device),
            "joint_attention_kwargs": None,
            "return_dict": False,
        }  # fmt: skip

    def encode_prompts(
        self, pipe: DiffusionPipeline, prompts: list[str], device: torch.device
    ) -> dict[str, torch.Tensor]:
        length = self.sampling.max_sequence_length or 512
        embeds, _ = pipe.encode_prompt(prompt=prompts, device=device, max_sequence_length=length)
        return {"prompt_embeds": embeds}


def is_single(block: nn.Module) -> bool:
    """Whether a FLUX.2 block is a single-stream one (fused projections)."""
    return hasattr(block, "attn") and hasattr(block.attn, "to_qkv_mlp_proj")


def packed_layout(block_name: str, block: nn.Module) -> tuple[int, int]:
    """(inner, mlp): the attention and MLP widths of a single block's fused projections, checked
    to tile `to_qkv_mlp_proj`'s rows as [q | k | v | gate | up] and `to_out`'s columns as
    [attention | MLP]; `ModelConfigError` naming the block where they do not."""
    attention: Any = block.get_submodule("attn")
    inner, mlp, factor = attention.inner_dim, attention.mlp_hidden_dim, attention.mlp_mult_factor
    rows, columns = linear_at(block, FUSED_IN).out_features, linear_at(block, FUSED_OUT).in_features
    if factor != 2 or rows != 3 * inner + 2 * mlp or columns != inner + mlp:
        raise ModelConfigError(
            f"granularity=structured: {block_name} does not hold FLUX.2's packed layout "
            f"({FUSED_IN} has {rows} rows, {FUSED_OUT} {columns} columns; its attention says "
            f"inner_dim={inner}, mlp_hidden_dim={mlp}, mlp_mult_factor={factor}, which need "
            f"{3 * inner + factor * mlp} and {inner + mlp}), so its heads and neurons cannot be "
            "cut consistently. Prune this model unstructured or N:M (each fused linear is one "
            "layer), or load the checkpoint as diffusers builds it"
        )
    return inner, mlp


def packed_groups(block: nn.Module) -> tuple[list[HeadGroup], list[NeuronGroup]]:
    """A single block's heads (rows in each of the q, k, v slices of the fused input projection,
    columns [0, inner) of the fused output) and MLP neurons (gate and up rows, columns after the
    attention's; the attention's `mlp_hidden_dim` follows them)."""
    inner, mlp = packed_layout("this block", block)
    heads = HeadGroup(
        "attn", ((FUSED_IN, 0), (FUSED_IN, inner), (FUSED_IN, 2 * inner)), ((FUSED_OUT, 0),), inner
    )
    gate, up = 3 * inner, 3 * inner + mlp
    neurons = NeuronGroup(
        ((FUSED_IN, gate), (FUSED_IN, up)), (FUSED_OUT, inner), mlp, ("attn", "mlp_hidden_dim")
    )
    return [heads], [neurons]
