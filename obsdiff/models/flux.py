"""Flux family: `FluxTransformer2DModel` (double- and single-stream blocks) in a `FluxPipeline`.

FLUX.1-dev is guidance-distilled: `guidance_scale` feeds the guidance embedding and each step is
one conditional denoiser call. Real classifier-free guidance (`true_cfg_scale > 1` with a
`negative_prompt`) costs two calls per step, conditional first. FLUX.1-schnell has no guidance
embedding and is sampled in 4 steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from obsdiff.models.base import TrueCfgAdapter, component_config, pack_2x2
from obsdiff.models.sampling import embedding_kwargs
from obsdiff.models.structure import (
    MMDIT_UNITS,
    HeadGroup,
    InputNames,
    NeuronGroup,
    Unit,
    head_group,
    linear_at,
    mmdit_groups,
    units_of,
)


if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


# single-stream blocks: q/k/v and the MLP read one normalised input; proj_out reads [attn, mlp]
SINGLE_UNITS: list[list[InputNames]] = [
    [("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")],
    [("proj_out",)],
]


class FluxAdapter(TrueCfgAdapter):
    family = "flux"
    pipeline_classes = ("FluxPipeline",)
    denoiser_attr = "transformer"
    # single blocks: proj_mlp is the MLP's up-projection, proj_out reads [attention, MLP]
    ffn_modules = ("ff", "ff_context", "proj_mlp", "proj_out")
    timestep_divisor = 1000.0  # FluxPipeline passes t / 1000
    tiny_variants = ("dev", "schnell")
    takes_max_sequence_length = True
    modulation_patterns = (
        "transformer_blocks.*.norm1.linear",
        "transformer_blocks.*.norm1_context.linear",
        "single_transformer_blocks.*.norm.linear",
        "norm_out.linear",
    )
    keep_out = {
        "embedders": ("x_embedder", "pos_embed", "time_text_embed", "context_embedder"),
        "final projection": ("proj_out",),
    }
    depth_lists = {
        "transformer_blocks": "num_layers",
        "single_transformer_blocks": "num_single_layers",
    }
    joint_blocks = True  # the single blocks too take and return both streams

    def build_tiny(self, variant: str, seed: int) -> DiffusionPipeline:
        from obsdiff.models import tiny  # diffusers and transformers, for the zoo only

        return tiny.tiny_flux_pipeline(seed=seed, guidance_embeds=variant == "dev")

    def block_units(self, block: nn.Module) -> list[Unit]:
        return units_of(block, SINGLE_UNITS if hasattr(block, "proj_mlp") else MMDIT_UNITS)

    def structured_groups(self, block: nn.Module) -> tuple[list[HeadGroup], list[NeuronGroup]]:
        """Double blocks: the MMDiT block's. Single blocks: `proj_out` consumes [attention,
        MLP], so the heads own its first columns and the MLP neurons the columns after them."""
        if not hasattr(block, "proj_mlp"):
            return mmdit_groups(block)
        inner = linear_at(block, "attn.to_q").out_features
        mlp = linear_at(block, "proj_mlp").out_features
        neurons = [NeuronGroup((("proj_mlp", 0),), ("proj_out", inner), mlp)]
        qkv = ["attn.to_q", "attn.to_k", "attn.to_v"]
        return head_group(block, "attn", qkv, ["proj_out"]), neurons

    def example_call(
        self, prompts: int, components: dict[str, nn.Module], device: str | torch.device = "meta"
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Latents packed 2 x 2 into tokens, T5 tokens, pooled CLIP, the guidance (dev); one
        call per branch."""
        config = component_config(components, self.denoiser_attr)
        tokens = self.sampling.max_sequence_length or 512
        height, width = self.latent_size(components)
        patches = (height // 2) * (width // 2)
        dtype = self.torch_dtype
        kwargs: dict[str, Any] = {
            "hidden_states": torch.empty(prompts, patches, config.in_channels, dtype=dtype,
                                         device=device),
            "timestep": torch.empty(prompts, dtype=dtype, device=device),
        }  # fmt: skip
        if config.guidance_embeds:
            kwargs["guidance"] = torch.empty(prompts, device=device)
        return (), kwargs | {
            "pooled_projections": torch.empty(prompts, config.pooled_projection_dim, dtype=dtype,
                                              device=device),
            "encoder_hidden_states": torch.empty(prompts, tokens, config.joint_attention_dim,
                                                 dtype=dtype, device=device),
            "txt_ids": torch.empty(tokens, 3, dtype=dtype, device=device),
            "img_ids": torch.empty(patches, 3, dtype=dtype, device=device),
            "joint_attention_kwargs": {},
            "return_dict": False,
        }  # fmt: skip

    def as_prediction(self, target: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h/2 * w/2, 4C): FluxPipeline's `_pack_latents`."""
        return pack_2x2(target)

    def encode_prompts(
        self, pipe: DiffusionPipeline, prompts: list[str], device: torch.device
    ) -> dict[str, torch.Tensor]:
        length = self.sampling.max_sequence_length or 512
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, max_sequence_length=length
        )
        if not self.uses_cfg():
            return embedding_kwargs(embeds, pooled)
        negative, negative_pooled, _ = pipe.encode_prompt(
            prompt=[self.sampling.negative_prompt or ""] * len(prompts),
            prompt_2=None,
            device=device,
            max_sequence_length=length,
        )
        return embedding_kwargs(embeds, pooled, negative, negative_pooled)
