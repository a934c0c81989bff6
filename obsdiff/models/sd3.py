"""SD3 / SD3.5 family: MMDiT (`SD3Transformer2DModel`) in a `StableDiffusion3Pipeline`.

Covers SD3-Medium, SD3.5-Medium (qk-norm and dual-attention `attn2` blocks) and SD3.5-Large
(qk-norm). CFG runs as one doubled batch `[uncond, cond]` per denoising step.
"""

from __future__ import annotations

from typing import Any

from diffusers import DiffusionPipeline

from obsdiff.models import tiny
from obsdiff.models.base import ModelAdapter, SamplingDefaults


class SD3Adapter(ModelAdapter):
    family = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    denoiser_attr = "transformer"
    tiny_variants = ("sd3", "sd35")

    def __init__(self, *args: Any, with_t5: bool = True, **kwargs: Any) -> None:
        """`with_t5=False` drops the T5 encoder (4.7 B parameters); SD3 then pads with zeros."""
        super().__init__(*args, **kwargs)
        self.with_t5 = with_t5

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "with_t5": self.with_t5}

    def _from_pretrained_kwargs(self) -> dict[str, Any]:
        return {} if self.with_t5 else {"text_encoder_3": None, "tokenizer_3": None}

    def build_tiny(self, variant: str, seed: int) -> DiffusionPipeline:
        return tiny.tiny_sd3_pipeline(seed=seed, with_t5=self.with_t5, sd35=variant == "sd35")

    def call_kwargs(self, sampling: SamplingDefaults | None = None) -> dict[str, Any]:
        s = sampling or self.sampling
        kwargs = super().call_kwargs(s)
        if s.max_sequence_length is not None:
            kwargs["max_sequence_length"] = s.max_sequence_length
        return kwargs
