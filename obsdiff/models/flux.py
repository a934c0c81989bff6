"""Flux family: `FluxTransformer2DModel` (double- and single-stream blocks) in a `FluxPipeline`.

FLUX.1-dev is guidance-distilled: `guidance_scale` feeds the guidance embedding and each step is
one conditional denoiser call. Real classifier-free guidance (`true_cfg_scale > 1` with a
`negative_prompt`) costs two calls per step, conditional first. FLUX.1-schnell has no guidance
embedding and is sampled in 4 steps.
"""

from __future__ import annotations

from typing import Any

from diffusers import DiffusionPipeline

from obsdiff.models import tiny
from obsdiff.models.base import ModelAdapter, SamplingDefaults


class FluxAdapter(ModelAdapter):
    family = "flux"
    pipeline_classes = ("FluxPipeline",)
    denoiser_attr = "transformer"
    tiny_variants = ("dev", "schnell")

    def build_tiny(self, variant: str, seed: int) -> DiffusionPipeline:
        return tiny.tiny_flux_pipeline(seed=seed, guidance_embeds=variant == "dev")

    def call_kwargs(self, sampling: SamplingDefaults | None = None) -> dict[str, Any]:
        s = sampling or self.sampling
        kwargs = super().call_kwargs(s)
        if s.true_cfg_scale is not None:
            kwargs["true_cfg_scale"] = s.true_cfg_scale
        if s.max_sequence_length is not None:
            kwargs["max_sequence_length"] = s.max_sequence_length
        return kwargs

    def uses_cfg(self, sampling: SamplingDefaults | None = None) -> bool:
        s = sampling or self.sampling
        return (s.true_cfg_scale or 1.0) > 1.0 and s.negative_prompt is not None
