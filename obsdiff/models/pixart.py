"""PixArt family: a DiT with *cross*-attention (`PixArtTransformer2DModel` in a
`PixArtSigmaPipeline`), the design of PixArt, Sana and many video DiTs.

Each of its 28 blocks (BasicTransformerBlock, `ada_norm_single`) holds self-attention (attn1),
cross-attention to the T5 text states (attn2: `to_q` reads the image tokens, `to_k`/`to_v` the
caption projection's output, so they are two input groups with two Hessians) and a GELU FFN.
Kept out of pruning: the adaLN-single timestep modulation (`adaln_single` and each block's
`scale_shift_table`), the caption projection, the patch embedding, `proj_out` and T5. CFG runs as
one doubled batch `[uncond, cond]` per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import DiffusionPipeline
from torch import nn

from obsdiff.models import tiny
from obsdiff.models.base import ModelAdapter
from obsdiff.models.sampling import SamplingDefaults
from obsdiff.models.structure import (
    HeadGroup,
    InputNames,
    NeuronGroup,
    Unit,
    ffn_group,
    head_group,
    present_groups,
)


PIXART_UNITS: list[list[InputNames]] = [
    [("attn1.to_q", "attn1.to_k", "attn1.to_v")],
    [("attn1.to_out.0",)],
    [("attn2.to_q",), ("attn2.to_k", "attn2.to_v")],  # image tokens; text states
    [("attn2.to_out.0",)],
    [("ff.net.0.proj",)],
    [("ff.net.2",)],
]


class PixArtAdapter(ModelAdapter):
    family = "pixart"
    pipeline_classes = ("PixArtSigmaPipeline",)
    denoiser_attr = "transformer"
    tiny_variants = ("sigma",)

    def build_tiny(self, variant: str, seed: int) -> DiffusionPipeline:
        return tiny.tiny_pixart_pipeline(seed=seed)

    def blocks(self, denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
        blocks: nn.ModuleList = denoiser.transformer_blocks  # type: ignore[assignment]
        return [(f"transformer_blocks.{i}", b) for i, b in enumerate(blocks)]

    def block_units(self, block: nn.Module) -> list[Unit]:
        units = [present_groups(block, groups) for groups in PIXART_UNITS]
        return [unit for unit in units if unit]

    def structured_groups(self, block: nn.Module) -> tuple[list[HeadGroup], list[NeuronGroup]]:
        """Self- and cross-attention heads (cross-attention k/v rows included) and the GELU FFN
        (not gated)."""
        heads = head_group(
            block, "attn1", ["attn1.to_q", "attn1.to_k", "attn1.to_v"], ["attn1.to_out.0"]
        )
        heads += head_group(
            block, "attn2", ["attn2.to_q", "attn2.to_k", "attn2.to_v"], ["attn2.to_out.0"]
        )
        return heads, ffn_group(block, "ff.net.0.proj", "ff.net.2")

    def default_blocks(self, num_blocks: int, structured: bool) -> tuple[int, int]:
        """Every block (no published pruned counts to match)."""
        return (0, num_blocks)

    def encode_prompts(
        self, pipe: DiffusionPipeline, prompts: list[str], device: torch.device
    ) -> dict[str, torch.Tensor]:
        cfg = self.uses_cfg()
        embeds, mask, negative, negative_mask = pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=cfg,
            negative_prompt=self.sampling.negative_prompt or "",
            device=device,
            max_sequence_length=self.sampling.max_sequence_length or 300,
        )
        out = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
        if cfg:
            out |= {
                "negative_prompt_embeds": negative,
                "negative_prompt_attention_mask": negative_mask,
            }
        return out

    def calibration_call(
        self,
        pipe: DiffusionPipeline,
        embeddings: dict[str, torch.Tensor],
        generators: list[torch.Generator],
        on_step_end: Callable[..., dict[str, Any]],
    ) -> Any:
        """As the base; the pipeline's default negative prompt ("") would clash with the
        precomputed negative embeddings, so it is None here."""
        kwargs = self.call_kwargs()
        kwargs["negative_prompt"] = None
        return pipe(
            **embeddings,
            **kwargs,
            generator=generators,
            output_type="latent",
            callback_on_step_end=on_step_end,
        )

    def call_kwargs(self, sampling: SamplingDefaults | None = None) -> dict[str, Any]:
        """As the base, without resolution binning (the sizes asked are the sizes made) and
        without caption cleaning (it needs BeautifulSoup and ftfy; prompts are used as given)."""
        s = sampling or self.sampling
        kwargs = super().call_kwargs(s) | {"use_resolution_binning": False, "clean_caption": False}
        if s.max_sequence_length is not None:
            kwargs["max_sequence_length"] = s.max_sequence_length
        return kwargs
