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
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from obsdiff.models.base import component_config
from obsdiff.models.basic_block import BasicBlockAdapter
from obsdiff.models.sampling import SamplingDefaults


if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


class PixArtAdapter(BasicBlockAdapter):
    family = "pixart"
    pipeline_classes = ("PixArtSigmaPipeline",)
    gated_ffn = False  # GELU
    denoiser_attr = "transformer"
    latent_argument = 0  # PixArtSigmaPipeline: the latent first and positional
    tiny_variants = ("sigma",)
    takes_max_sequence_length = True
    modulation_patterns = ("adaln_single.linear",)  # the blocks' own scale-shift tables add to it
    keep_out = {
        "embedders": ("pos_embed", "adaln_single.emb", "caption_projection"),
        "final projection": ("proj_out",),
    }
    depth_lists = {"transformer_blocks": "num_layers"}

    def build_tiny(self, variant: str, seed: int) -> DiffusionPipeline:
        from obsdiff.models import tiny  # diffusers and transformers, for the zoo only

        return tiny.tiny_pixart_pipeline(seed=seed)

    def example_call(
        self, prompts: int, components: dict[str, nn.Module], device: str | torch.device = "meta"
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """[uncond, cond] latents, T5 tokens with their mask, an integer timestep."""
        config = component_config(components, self.denoiser_attr)
        tokens = self.sampling.max_sequence_length or 300
        batch, (height, width) = self.samples_per_call(prompts), self.latent_size(components)
        dtype = self.torch_dtype
        latents = torch.empty(batch, config.in_channels, height, width, dtype=dtype, device=device)
        return (latents,), {
            "encoder_hidden_states": torch.empty(batch, tokens, config.caption_channels,
                                                 dtype=dtype, device=device),
            "encoder_attention_mask": torch.empty(batch, tokens, dtype=torch.int64, device=device),
            "timestep": torch.empty(batch, dtype=torch.int64, device=device),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
            "return_dict": False,
        }  # fmt: skip

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

    def calibration_kwargs(self) -> dict[str, Any]:
        """The pipeline's default negative prompt ("") would clash with the precomputed
        negative embeddings: None here."""
        return super().calibration_kwargs() | {"negative_prompt": None}

    def step_callback(
        self,
        pipe: DiffusionPipeline,
        on_step_end: Callable[..., dict[str, Any]],
        latents: bool = False,
    ) -> dict[str, Any]:
        """PixArt-Sigma's pipeline reports a finished step through the legacy
        `callback(step, timestep, latents)` only (it takes `callback_on_step_end` into its
        `**kwargs` and never calls it)."""

        def callback(step: int, timestep: Any, step_latents: torch.Tensor) -> None:
            on_step_end(pipe, step, timestep, {"latents": step_latents})

        return {"callback": callback, "callback_steps": 1}

    def call_kwargs(self, sampling: SamplingDefaults | None = None) -> dict[str, Any]:
        """As the base, without resolution binning (the sizes asked are the sizes made) and
        without caption cleaning (it needs BeautifulSoup and ftfy; prompts are used as given)."""
        return super().call_kwargs(sampling) | {
            "use_resolution_binning": False,
            "clean_caption": False,
        }
