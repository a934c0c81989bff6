"""The UNet family: `UNet2DConditionModel` denoisers of SDXL (`StableDiffusionXLPipeline`, two
CLIP text encoders and `text_time` added conditioning), SD 2.1 and SD 1.5
(`StableDiffusionPipeline`, one CLIP text encoder: OpenCLIP-H of width 1024 with linear
`proj_in`/`proj_out`, or CLIP-L of width 768 with convolutional 1x1 ones). What differs between
them is data (text encoders, added conditioning), not structure: the same target linears in
every BasicTransformerBlock (attn1, attn2, the GEGLU FFN), the same head and neuron groups;
`proj_in`/`proj_out`, convolutions, time and added embeddings are not pruned. CFG runs as one
doubled batch `[uncond, cond]`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from obsdiff.models.base import component_config
from obsdiff.models.basic_block import BasicBlockAdapter
from obsdiff.models.sampling import embedding_kwargs


if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


class UNetAdapter(BasicBlockAdapter):
    family = "unet"
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionPipeline")
    gated_ffn = True  # GEGLU
    denoiser_attr = "unet"
    latent_argument, timestep_argument = 0, 1  # the SD pipelines: both positional
    tiny_variants = ("sdxl", "sd21", "sd15")
    modulation_patterns = (
        "*.resnets.*.time_emb_proj",
    )  # each resnet's scale of the time embedding
    keep_out = {
        "embedders": ("conv_in", "time_embedding", "add_embedding"),
        "final projection": ("conv_norm_out", "conv_out"),
    }

    def build_tiny(self, variant: str, seed: int) -> DiffusionPipeline:
        from obsdiff.models import tiny  # diffusers and transformers, for the zoo only

        if variant == "sdxl":
            return tiny.tiny_sdxl_pipeline(seed=seed)
        return tiny.tiny_sd_pipeline(seed=seed, linear_projection=variant == "sd21")

    def denoising_steps(self, pipe: DiffusionPipeline) -> int:
        """The scheduler's timesteps for `num_inference_steps`: SD 1.5 and 2.1's PNDM (PLMS)
        repeats its second timestep, one denoiser step more, weighted on its own."""
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(self.sampling.num_inference_steps)
        return len(scheduler.timesteps)

    def _from_pretrained_kwargs(self) -> dict[str, Any]:
        """SD 1.5 and 2.1 checkpoints: without the safety checker (it would blank images the
        evaluation scores; calibration never decodes)."""
        if self._pipeline_index().get("_class_name") == "StableDiffusionPipeline":
            return {"safety_checker": None, "feature_extractor": None,
                    "requires_safety_checker": False}  # fmt: skip
        return {}

    def blocks(self, denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every BasicTransformerBlock in forward order: down blocks, mid block, up blocks."""
        from diffusers.models.attention import BasicTransformerBlock  # a denoiser is loaded

        found = []
        for part in ("down_blocks", "mid_block", "up_blocks"):
            module = getattr(denoiser, part, None)
            if module is None:
                continue
            for name, sub in module.named_modules():
                if isinstance(sub, BasicTransformerBlock):
                    found.append((f"{part}.{name}", sub))
        return found

    def example_call(
        self, prompts: int, components: dict[str, nn.Module], device: str | torch.device = "meta"
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """[uncond, cond] latents, one timestep, CLIP tokens; SDXL's pooled text and size ids."""
        config = component_config(components, self.denoiser_attr)
        clip = component_config(components, "text_encoder").max_position_embeddings
        batch, (height, width) = self.samples_per_call(prompts), self.latent_size(components)
        dtype = self.torch_dtype
        latents = torch.empty(batch, config.in_channels, height, width, dtype=dtype, device=device)
        added = None
        if "text_encoder_2" in components:  # SDXL
            pooled = component_config(components, "text_encoder_2").projection_dim
            added = {
                "text_embeds": torch.empty(batch, pooled, dtype=dtype, device=device),
                "time_ids": torch.empty(batch, 6, dtype=dtype, device=device),
            }
        return (latents, torch.empty((), device=device)), {
            "encoder_hidden_states": torch.empty(batch, clip, config.cross_attention_dim,
                                                 dtype=dtype, device=device),
            "timestep_cond": None,
            "cross_attention_kwargs": None,
            "added_cond_kwargs": added,
            "return_dict": False,
        }  # fmt: skip

    def encode_prompts(
        self, pipe: DiffusionPipeline, prompts: list[str], device: torch.device
    ) -> dict[str, torch.Tensor]:
        cfg = self.uses_cfg()
        if type(pipe).__name__ == "StableDiffusionPipeline":  # one encoder, nothing pooled
            embeds, negative = pipe.encode_prompt(
                prompt=prompts,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=cfg,
                negative_prompt=self.sampling.negative_prompt,
            )
            out = {"prompt_embeds": embeds}
            return out | ({"negative_prompt_embeds": negative} if cfg else {})
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts,
            device=device,
            do_classifier_free_guidance=cfg,
            negative_prompt=self.sampling.negative_prompt,
        )
        if not cfg:
            return embedding_kwargs(embeds, pooled)
        return embedding_kwargs(embeds, pooled, negative, negative_pooled)


SDXLAdapter = UNetAdapter  # its first name: the configs and saved runs of SDXL name it
