"""How a pipeline is called: sampling defaults, how classifier-free guidance reaches the
denoiser, and the keyword arguments of precomputed prompt embeddings."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import Any

import torch

from obsdiff.models.loading import ModelConfigError


# How classifier-free guidance reaches the denoiser (`ModelAdapter.cfg_mode`).
CFG_NONE, CFG_DOUBLED_BATCH, CFG_SEPARATE_CALLS = CFG_MODES = (
    "none",
    "doubled_batch",
    "separate_calls",
)


@dataclass(frozen=True)
class SamplingDefaults:
    """How the pipeline is called by default (the paper's setup for each real model).

    `negative_prompt` and `true_cfg_scale` matter only where the pipeline accepts them
    (`true_cfg_scale > 1` turns on real classifier-free guidance for Flux).
    `max_sequence_length` caps the text encoder's prompt length (the families with T5, UMT5,
    Qwen2.5-VL or Mistral-3 prompts). `num_frames`: a video model's frames (null for images);
    `guidance_scale_2`: the CFG scale of a second expert's steps (Wan 2.2's low-noise expert;
    null: `guidance_scale`).
    """

    num_inference_steps: int = 28
    guidance_scale: float = 7.0
    height: int = 512
    width: int = 512
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None
    max_sequence_length: int | None = None
    num_frames: int | None = None
    guidance_scale_2: float | None = None

    def __post_init__(self) -> None:
        problems = []
        kinds = {
            "num_inference_steps": int,
            "height": int,
            "width": int,
            "guidance_scale": float,
            "true_cfg_scale": float,
            "max_sequence_length": int,
            "num_frames": int,
            "guidance_scale_2": float,
        }
        optional = ("true_cfg_scale", "max_sequence_length", "num_frames", "guidance_scale_2")
        for key, kind in kinds.items():
            value = getattr(self, key)
            if value is None and key in optional:
                continue
            allowed, what = ((int,), "an integer") if kind is int else ((int, float), "a number")
            if isinstance(value, bool) or not isinstance(value, allowed):
                problems.append(f"model.sampling.{key}={value!r} is not {what}")
        if problems:
            raise ModelConfigError("invalid model.sampling: " + "; ".join(problems))
        if self.num_inference_steps < 1:
            problems.append(f"num_inference_steps={self.num_inference_steps} must be >= 1")
        if self.guidance_scale < 0:
            problems.append(f"guidance_scale={self.guidance_scale} must be >= 0")
        if self.height < 8 or self.width < 8:
            problems.append(f"height x width = {self.height} x {self.width} is too small")
        if self.true_cfg_scale is not None and self.true_cfg_scale < 1:
            problems.append(f"true_cfg_scale={self.true_cfg_scale} must be >= 1 (or null)")
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            problems.append(f"max_sequence_length={self.max_sequence_length} must be >= 1")
        if self.num_frames is not None and self.num_frames < 1:
            problems.append(f"num_frames={self.num_frames} must be >= 1 (or null for images)")
        if self.guidance_scale_2 is not None and self.guidance_scale_2 < 0:
            problems.append(f"guidance_scale_2={self.guidance_scale_2} must be >= 0 (or null)")
        if problems:
            raise ModelConfigError("invalid model.sampling: " + "; ".join(problems))


SAMPLING_KEYS = tuple(f.name for f in fields(SamplingDefaults))
CALL_DEFAULTS = ("num_inference_steps", "guidance_scale", "max_sequence_length", "num_frames")


def pipeline_sampling(pipe: Any, denoiser: Any) -> dict[str, Any]:
    """How `pipe(prompt)` samples when given nothing else: its `__call__`'s default steps,
    guidance and T5 prompt length, and its default resolution (the pipeline's
    `default_sample_size`, else the denoiser's `sample_size`, times the VAE's scale factor).
    The keys it cannot tell are left out."""
    try:
        parameters = inspect.signature(type(pipe).__call__).parameters
    except (TypeError, ValueError):
        parameters = {}  # type: ignore[assignment]
    found: dict[str, Any] = {}
    for key in CALL_DEFAULTS:
        default = parameters[key].default if key in parameters else None
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            found[key] = default
    config = getattr(denoiser, "config", None)
    size = getattr(pipe, "default_sample_size", None) or getattr(config, "sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", None)
    if isinstance(size, int) and isinstance(scale, int):
        found["height"] = found["width"] = size * scale
    return found


def embedding_kwargs(
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    negative: torch.Tensor | None = None,
    negative_pooled: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Pipeline keyword arguments for precomputed prompt embeddings (negatives only with CFG)."""
    out = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if negative is not None and negative_pooled is not None:
        out.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
    return out
