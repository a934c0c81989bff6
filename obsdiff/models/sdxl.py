"""SDXL family: `UNet2DConditionModel` with `text_time` added conditioning in a
`StableDiffusionXLPipeline`. CFG runs as one doubled batch `[uncond, cond]` per step."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from obsdiff.models import tiny
from obsdiff.models.base import ModelAdapter
from obsdiff.models.sampling import embedding_kwargs
from obsdiff.models.structure import (
    HeadGroup,
    InputNames,
    NeuronGroup,
    Unit,
    ffn_group,
    head_group,
    present_groups,
)


# A BasicTransformerBlock: self-attention, cross-attention (to_q reads the image tokens, to_k and
# to_v the text states: parallel), GEGLU FFN (one projection holds both halves).
SDXL_UNITS: list[list[InputNames]] = [
    [("attn1.to_q", "attn1.to_k", "attn1.to_v")],
    [("attn1.to_out.0",)],
    [("attn2.to_q",), ("attn2.to_k", "attn2.to_v")],
    [("attn2.to_out.0",)],
    [("ff.net.0.proj",)],
    [("ff.net.2",)],
]


class SDXLAdapter(ModelAdapter):
    family = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    denoiser_attr = "unet"
    tiny_variants = ("sdxl",)

    def build_tiny(self, variant: str, seed: int) -> DiffusionPipeline:
        return tiny.tiny_sdxl_pipeline(seed=seed)

    def blocks(self, denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every BasicTransformerBlock in forward order: down blocks, mid block, up blocks."""
        found = []
        for part in ("down_blocks", "mid_block", "up_blocks"):
            module = getattr(denoiser, part, None)
            if module is None:
                continue
            for name, sub in module.named_modules():
                if isinstance(sub, BasicTransformerBlock):
                    found.append((f"{part}.{name}", sub))
        return found

    def block_units(self, block: nn.Module) -> list[Unit]:
        units = [present_groups(block, groups) for groups in SDXL_UNITS]
        return [unit for unit in units if unit]

    def structured_groups(self, block: nn.Module) -> tuple[list[HeadGroup], list[NeuronGroup]]:
        """Self- and cross-attention heads (cross-attention k/v rows included) and the GEGLU FFN
        (value and gate halves of one projection kept together)."""
        heads = head_group(
            block, "attn1", ["attn1.to_q", "attn1.to_k", "attn1.to_v"], ["attn1.to_out.0"]
        )
        heads += head_group(
            block, "attn2", ["attn2.to_q", "attn2.to_k", "attn2.to_v"], ["attn2.to_out.0"]
        )
        return heads, ffn_group(block, "ff.net.0.proj", "ff.net.2", gated=True)

    def default_blocks(self, num_blocks: int, structured: bool) -> tuple[int, int]:
        """Every BasicTransformerBlock (the released SDXL checkpoints' parameter counts)."""
        return (0, num_blocks)

    def encode_prompts(
        self, pipe: DiffusionPipeline, prompts: list[str], device: torch.device
    ) -> dict[str, torch.Tensor]:
        cfg = self.uses_cfg()
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts,
            device=device,
            do_classifier_free_guidance=cfg,
            negative_prompt=self.sampling.negative_prompt,
        )
        if not cfg:
            return embedding_kwargs(embeds, pooled)
        return embedding_kwargs(embeds, pooled, negative, negative_pooled)
