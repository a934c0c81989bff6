"""SD3 / SD3.5 family: MMDiT (`SD3Transformer2DModel`) in a `StableDiffusion3Pipeline`.

Covers SD3-Medium, SD3.5-Medium (qk-norm and dual-attention `attn2` blocks) and SD3.5-Large
(qk-norm). CFG runs as one doubled batch `[uncond, cond]` per denoising step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from obsdiff.models.base import IMAGE_FIRST, ModelAdapter, component_config
from obsdiff.models.sampling import embedding_kwargs
from obsdiff.models.structure import (
    MMDIT_UNITS,
    HeadGroup,
    InputNames,
    NeuronGroup,
    Unit,
    head_group,
    mmdit_groups,
    units_of,
)


if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


# The 12 target linears of a JointTransformerBlock (paper Sec. 1.5) as basic units, plus the
# dual-attention `attn2` of SD3.5-Medium (image tokens only) beside the joint attention.
SD3_UNITS: list[list[InputNames]] = [
    [*MMDIT_UNITS[0], ("attn2.to_q", "attn2.to_k", "attn2.to_v")],
    [*MMDIT_UNITS[1], ("attn2.to_out.0",)],
    *MMDIT_UNITS[2:],
]


class SD3Adapter(ModelAdapter):
    family = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    denoiser_attr = "transformer"
    tiny_variants = ("sd3", "sd35")
    takes_max_sequence_length = True
    joint_attention = IMAGE_FIRST  # JointAttnProcessor2_0: [image, text]
    modulation_patterns = (
        "transformer_blocks.*.norm1.linear",
        "transformer_blocks.*.norm1_context.linear",
        "norm_out.linear",
    )
    keep_out = {
        "embedders": ("pos_embed", "time_text_embed", "context_embedder"),
        "final projection": ("proj_out",),
    }
    depth_lists = {"transformer_blocks": "num_layers"}
    joint_blocks = True

    def remove_blocks(self, denoiser: nn.Module, names: list[str]) -> None:
        """As every family, and SD3.5-Medium's `dual_attention_layers` renumbered to the blocks
        that stay."""
        count = len(denoiser.transformer_blocks)  # type: ignore[arg-type]
        gone = {int(name.rsplit(".", 1)[1]) for name in names}
        kept = [index for index in range(count) if index not in gone]
        dual = set(denoiser.config.dual_attention_layers)  # type: ignore[union-attr,arg-type]
        super().remove_blocks(denoiser, names)
        renumbered = tuple(new for new, old in enumerate(kept) if old in dual)
        denoiser.register_to_config(dual_attention_layers=renumbered)  # type: ignore[operator]

    def __init__(self, *args: Any, with_t5: bool = True, **kwargs: Any) -> None:
        """`with_t5=False` drops the T5 encoder (4.7 B parameters); SD3 then pads with zeros."""
        super().__init__(*args, **kwargs)
        self.with_t5 = with_t5

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "with_t5": self.with_t5}

    def _from_pretrained_kwargs(self) -> dict[str, Any]:
        return {} if self.with_t5 else {"text_encoder_3": None, "tokenizer_3": None}

    def build_tiny(self, variant: str, seed: int) -> DiffusionPipeline:
        from obsdiff.models import tiny  # diffusers and transformers, for the zoo only

        return tiny.tiny_sd3_pipeline(seed=seed, with_t5=self.with_t5, sd35=variant == "sd35")

    def block_units(self, block: nn.Module) -> list[Unit]:
        return units_of(block, SD3_UNITS)

    def structured_groups(self, block: nn.Module) -> tuple[list[HeadGroup], list[NeuronGroup]]:
        """The MMDiT block's joint heads and FFN neurons, and the heads of SD3.5-Medium's dual
        attention."""
        heads, neurons = mmdit_groups(block)
        heads += head_group(
            block, "attn2", ["attn2.to_q", "attn2.to_k", "attn2.to_v"], ["attn2.to_out.0"]
        )
        return heads, neurons

    def example_call(
        self, prompts: int, components: dict[str, nn.Module], device: str | torch.device = "meta"
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """[uncond, cond] latents, CLIP + T5 (or its zero padding) tokens, pooled CLIP."""
        config = component_config(components, self.denoiser_attr)
        clip = component_config(components, "text_encoder").max_position_embeddings
        tokens = clip + (self.sampling.max_sequence_length or 256)
        batch, (height, width) = self.samples_per_call(prompts), self.latent_size(components)
        dtype = self.torch_dtype
        return (), {
            "hidden_states": torch.empty(batch, config.in_channels, height, width, dtype=dtype,
                                         device=device),
            "timestep": torch.empty(batch, device=device),
            "encoder_hidden_states": torch.empty(batch, tokens, config.joint_attention_dim,
                                                 dtype=dtype, device=device),
            "pooled_projections": torch.empty(batch, config.pooled_projection_dim, dtype=dtype,
                                              device=device),
            "joint_attention_kwargs": None,
            "return_dict": False,
        }  # fmt: skip

    def encode_prompts(
        self, pipe: DiffusionPipeline, prompts: list[str], device: torch.device
    ) -> dict[str, torch.Tensor]:
        cfg = self.uses_cfg()
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=cfg,
            negative_prompt=self.sampling.negative_prompt or "",
            max_sequence_length=self.sampling.max_sequence_length or 256,
        )
        if not cfg:
            return embedding_kwargs(embeds, pooled)
        return embedding_kwargs(embeds, pooled, negative, negative_pooled)
