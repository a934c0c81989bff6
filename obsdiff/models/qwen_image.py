"""Qwen-Image family: `QwenImageTransformer2DModel` (60 MMDiT blocks) in a `QwenImagePipeline`.

Each block is SD3's joint design under other names: joint attention over the image and text
streams (`to_q/k/v`, `to_out.0`; `add_q/k/v_proj`, `to_add_out`; QK-RMSNorm) and one GELU-tanh
FFN per stream (`img_mlp`, `txt_mlp`). Its per-block modulation (`img_mod.1`, `txt_mod.1`, a
third of the model) reads the timestep embedding alone, so `modulation=low_rank` is exact over
the timesteps a sampler visits. Kept out of pruning: the modulation (unless low rank is asked),
the timestep embedder, `img_in`, `txt_norm` and `txt_in`, `norm_out` and `proj_out`, the
Qwen2.5-VL text encoder. The latents are packed 2 x 2 into tokens as Flux's; real CFG
(`true_cfg_scale > 1` with a negative prompt) is a second, unconditional call per step, whose
prediction the pipeline rescales to the conditional one's norm. The text is as long as the
longest prompt of a batch (masked where shorter), at most `max_sequence_length` tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from obsdiff.models.base import TrueCfgAdapter, component_config, pack_2x2
from obsdiff.models.sampling import SamplingDefaults
from obsdiff.models.structure import (
    MMDIT_UNITS,
    HeadGroup,
    InputNames,
    NeuronGroup,
    Unit,
    ffn_group,
    head_group,
    units_of,
)


if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


# The 12 target linears of a QwenImageTransformerBlock as basic units: SD3's MMDiT units with
# the FFNs named `img_mlp` and `txt_mlp`.
QWEN_IMAGE_UNITS: list[list[InputNames]] = [
    *MMDIT_UNITS[:2],  # the joint attention's
    [("img_mlp.net.0.proj",), ("txt_mlp.net.0.proj",)],
    [("img_mlp.net.2",), ("txt_mlp.net.2",)],
]


class QwenImageAdapter(TrueCfgAdapter):
    family = "qwen_image"
    pipeline_classes = ("QwenImagePipeline",)
    denoiser_attr = "transformer"
    tiny_variants = ("qwen_image",)
    takes_max_sequence_length = True
    ffn_modules = ("img_mlp", "txt_mlp")
    timestep_divisor = 1000.0  # QwenImagePipeline passes t / 1000
    modulation_patterns = (
        "transformer_blocks.*.img_mod.1",
        "transformer_blocks.*.txt_mod.1",
        "norm_out.linear",
    )
    keep_out = {
        "embedders": ("img_in", "txt_norm", "txt_in", "time_text_embed"),
        "final projection": ("proj_out",),
    }
    depth_lists = {"transformer_blocks": "num_layers"}
    joint_blocks = True

    def build_tiny(self, variant: str, seed: int) -> DiffusionPipeline:
        from obsdiff.models import tiny  # diffusers and transformers, for the zoo only

        return tiny.tiny_qwen_image_pipeline(seed=seed)

    def block_units(self, block: nn.Module) -> list[Unit]:
        return units_of(block, QWEN_IMAGE_UNITS)

    def structured_groups(self, block: nn.Module) -> tuple[list[HeadGroup], list[NeuronGroup]]:
        """The joint heads (both streams' q/k/v, one output projection each) and the neurons of
        both GELU FFNs."""
        producers = [name for group in QWEN_IMAGE_UNITS[0] for name in group]
        heads = head_group(block, "attn", producers, ["attn.to_out.0", "attn.to_add_out"])
        neurons = ffn_group(block, "img_mlp.net.0.proj", "img_mlp.net.2")
        neurons += ffn_group(block, "txt_mlp.net.0.proj", "txt_mlp.net.2")
        return heads, neurons

    def call_kwargs(self, sampling: SamplingDefaults | None = None) -> dict[str, Any]:
        """As Flux's, without `guidance_scale` (Qwen-Image is not guidance-distilled: its
        pipeline ignores it with a warning) and with `true_cfg_scale` always given (the
        pipeline's own default is 4)."""
        s = sampling or self.sampling
        kwargs = super().call_kwargs(s)
        kwargs.pop("guidance_scale")
        kwargs["true_cfg_scale"] = s.true_cfg_scale or 1.0
        return kwargs

    def vae_scale_factor(self, components: dict[str, nn.Module]) -> int:
        """AutoencoderKLQwenImage: one halving per entry of `temperal_downsample`."""
        return int(2 ** len(component_config(components, "vae").temperal_downsample))

    def latent_channels(self, components: dict[str, nn.Module]) -> int:
        return int(component_config(components, "vae").z_dim)

    def encode_latents(self, vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """A one-frame video through the causal VAE, normalised per channel by its
        `latents_mean` and `latents_std` (what the pipeline undoes before decoding)."""
        config: Any = getattr(vae, "config")  # noqa: B009 - nn.Module types it as a Module
        encoded = vae.encode(images[:, :, None]).latent_dist.mode()[:, :, 0]  # type: ignore[operator]
        mean = torch.tensor(config.latents_mean, dtype=encoded.dtype, device=encoded.device)
        std = torch.tensor(config.latents_std, dtype=encoded.dtype, device=encoded.device)
        return (encoded - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)  # (B, C, h, w)

    def as_prediction(self, target: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h/2 * w/2, 4C): QwenImagePipeline's `_pack_latents`."""
        return pack_2x2(target)

    def example_call(
        self, prompts: int, components: dict[str, nn.Module], device: str | torch.device = "meta"
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Packed latents, `max_sequence_length` text tokens (the longest a call passes; their
        padding mask, when prompts differ in length, is left out: a few bytes), one call per
        branch."""
        config = component_config(components, self.denoiser_attr)
        tokens = self.sampling.max_sequence_length or 512
        height, width = self.latent_size(components)
        patches = (height // 2) * (width // 2)
        dtype = self.torch_dtype
        return (), {
            "hidden_states": torch.empty(prompts, patches, config.in_channels, dtype=dtype,
                                         device=device),
            "timestep": torch.empty(prompts, dtype=dtype, device=device),
            "guidance": None,
            "encoder_hidden_states_mask": None,
            "encoder_hidden_states": torch.empty(prompts, tokens, config.joint_attention_dim,
                                                 dtype=dtype, device=device),
            "img_shapes": [[(1, height // 2, width // 2)]] * prompts,
            "attention_kwargs": {},
            "return_dict": False,
        }  # fmt: skip

    def encode_prompts(
        self, pipe: DiffusionPipeline, prompts: list[str], device: torch.device
    ) -> dict[str, torch.Tensor]:
        length = self.sampling.max_sequence_length or 512
        embeds, mask = pipe.encode_prompt(prompt=prompts, device=device, max_sequence_length=length)
        out = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
        if self.uses_cfg():
            negative, negative_mask = pipe.encode_prompt(
                prompt=[self.sampling.negative_prompt or ""] * len(prompts),
                device=device,
                max_sequence_length=length,
            )
            out["negative_prompt_embeds"] = negative
            out["negative_prompt_embeds_mask"] = negative_mask
        return {key: value for key, value in out.items() if value is not None}
