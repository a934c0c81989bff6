"""SDXL family: `UNet2DConditionModel` with `text_time` added conditioning in a
`StableDiffusionXLPipeline`. CFG runs as one doubled batch `[uncond, cond]` per step."""

from __future__ import annotations

from diffusers import DiffusionPipeline

from obsdiff.models import tiny
from obsdiff.models.base import ModelAdapter


class SDXLAdapter(ModelAdapter):
    family = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    denoiser_attr = "unet"
    tiny_variants = ("sdxl",)

    def build_tiny(self, variant: str, seed: int) -> DiffusionPipeline:
        return tiny.tiny_sdxl_pipeline(seed=seed)
