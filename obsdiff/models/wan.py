"""Wan 2.x family: `WanTransformer3DModel` (a video DiT) in a `WanPipeline`.

Each of Wan 2.1-T2V-14B's 40 blocks holds self-attention over the video tokens (`attn1`),
cross-attention to the UMT5 text states (`attn2`: `to_q` reads the video tokens, `to_k`/`to_v`
the text embedder's output: two input groups, two Hessians) and a GELU-tanh FFN (`ffn`). The
query and key norms of both attentions are RMSNorms over all the heads' channels at once, so
structured pruning cuts the removed heads' channels out of them too, and the kept heads'
normalisation changes with it (not exact, unlike per-head norms). Kept out of pruning: the
modulation (`condition_embedder.time_proj`, shared by every block, reading the timestep alone:
exact under `modulation=low_rank`; each block's `scale_shift_table`), the timestep and text
embedders, the patch embedding (a Conv3d), `proj_out` and UMT5. CFG is a second, unconditional
call per step (conditional first).

A call sees (frames - 1) / 4 + 1 latent frames of (height / 16) x (width / 16) tokens: 75,600
at 81 frames of 720 x 1280. `calibration.max_tokens` caps what each hook feeds the statistics.

Wan 2.2-A14B (`wan22_t2v_a14b`, tiny recipe `a14b`) has two such transformers: `transformer`
denoises the high-noise steps (t >= `boundary_ratio` x 1000), `transformer_2` the rest.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from obsdiff.models.base import ModelAdapter, component_config
from obsdiff.models.experts import Experts
from obsdiff.models.loading import ModelConfigError
from obsdiff.models.sampling import CFG_NONE, CFG_SEPARATE_CALLS, SamplingDefaults
from obsdiff.models.structure import (
    BASIC_BLOCK_UNITS,
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


# A WanTransformerBlock: a BasicTransformerBlock's units with the FFN named `ffn`
WAN_UNITS: list[list[InputNames]] = [
    *BASIC_BLOCK_UNITS[:4],
    [("ffn.net.0.proj",)],
    [("ffn.net.2",)],
]
TEMPORAL_FACTOR = 4  # every Wan VAE: latent frames = (frames - 1) / 4 + 1
DEFAULT_FRAMES = 81  # WanPipeline's default, 5 s at 16 fps
SIZE_MULTIPLE = 16  # the VAE's 8 x the patch's 2: WanPipeline refuses other heights and widths


class WanAdapter(ModelAdapter):
    family = "wan"
    pipeline_classes = ("WanPipeline",)
    denoiser_attr = "transformer"
    tiny_variants = ("t2v", "a14b")
    takes_max_sequence_length = True
    ffn_modules = ("ffn",)
    # shared by the blocks (which add their own tables), one per expert
    modulation_patterns = ("condition_embedder.time_proj",)
    keep_out = {
        "embedders": (
            "rope", "patch_embedding", "condition_embedder.time_embedder",
            "condition_embedder.text_embedder",
        ),
        "final projection": ("proj_out",),
    }  # fmt: skip
    depth_lists = {"blocks": "num_layers"}
    video = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """As every adapter; the sampling's frames (81, the pipeline's default, when it names
        none) must be a count the VAE takes and its size one the pipeline takes
        (`ModelConfigError` before anything loads)."""
        super().__init__(*args, **kwargs)
        if self.sampling.num_frames is None:  # WanPipeline's own default
            self.sampling = replace(self.sampling, num_frames=DEFAULT_FRAMES)
        s = self.sampling
        assert s.num_frames is not None
        if (s.num_frames - 1) % TEMPORAL_FACTOR:
            near = " or ".join(str(n) for n in nearest_frames(s.num_frames) if n >= 1)
            raise ModelConfigError(
                f"model {self.name!r}: model.sampling.num_frames={s.num_frames} is not a frame "
                f"count Wan's VAE takes (4 k + 1: one frame, then groups of {TEMPORAL_FACTOR}); "
                f"use model.sampling.num_frames={near}"
            )
        if s.height % SIZE_MULTIPLE or s.width % SIZE_MULTIPLE:
            raise ModelConfigError(
                f"model {self.name!r}: model.sampling.height x width = {s.height} x {s.width}; "
                f"Wan takes multiples of {SIZE_MULTIPLE} (e.g. 480 x 832 or 720 x 1280)"
            )

    def expert_names(self, components: dict[str, Any]) -> tuple[str, ...]:
        """`transformer`, and `transformer_2` where the pipeline has it (Wan 2.2-A14B)."""
        two = components.get("transformer_2") is not None
        return ("transformer", "transformer_2") if two else ("transformer",)

    def expert_steps(self, pipe: DiffusionPipeline) -> dict[str, list[int]]:
        """Of two experts, as WanPipeline picks them: `transformer` at the steps whose timestep
        is at least `boundary_ratio` x the scheduler's training steps, `transformer_2` after."""
        names = self.expert_names(pipe.components)
        if len(names) == 1:
            return super().expert_steps(pipe)
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(self.sampling.num_inference_steps)
        boundary = pipe.config.boundary_ratio * scheduler.config.num_train_timesteps
        high = [i for i, t in enumerate(scheduler.timesteps) if t >= boundary]
        low = [i for i in range(len(scheduler.timesteps)) if i not in high]
        return dict(zip(names, (high, low), strict=True))

    def denoiser_at(self, pipe: DiffusionPipeline, timestep: float) -> nn.Module:
        """Of two experts, `transformer` from `boundary_ratio` x the training steps up (the
        high-noise steps), `transformer_2` below, as WanPipeline picks them."""
        names = self.expert_names(pipe.components)
        if len(names) == 1:
            return super().denoiser_at(pipe, timestep)
        boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
        return getattr(pipe, names[0] if timestep >= boundary else names[1])  # type: ignore[no-any-return]

    def build_tiny(self, variant: str, seed: int) -> DiffusionPipeline:
        from obsdiff.models import tiny  # diffusers and transformers, for the zoo only

        return tiny.tiny_wan_pipeline(seed=seed, two_experts=variant == "a14b")

    def blocks(self, denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
        """As every family; of two experts, each expert's, the high-noise expert's first."""
        if not isinstance(denoiser, Experts):
            return super().blocks(denoiser)
        return [
            (f"{expert}.{name}", block)
            for expert, module in denoiser.named_children()
            for name, block in ModelAdapter.blocks(self, module)
        ]

    def block_units(self, block: nn.Module) -> list[Unit]:
        return units_of(block, WAN_UNITS)

    def structured_groups(self, block: nn.Module) -> tuple[list[HeadGroup], list[NeuronGroup]]:
        """Self- and cross-attention heads (with their channels of the q/k norms) and the FFN's
        neurons."""
        heads: list[HeadGroup] = []
        for attention in ("attn1", "attn2"):
            qkv = [f"{attention}.to_q", f"{attention}.to_k", f"{attention}.to_v"]
            norms = [f"{attention}.norm_q", f"{attention}.norm_k"]
            heads += head_group(
                block, attention, qkv, [f"{attention}.to_out.0"], channel_norms=norms
            )
        return heads, ffn_group(block, "ffn.net.0.proj", "ffn.net.2")

    def remove_blocks(self, denoiser: nn.Module, names: list[str]) -> None:
        """As every family; of two experts (never depth-pruned: `depth_candidates` refuses),
        each expert's own blocks."""
        if not isinstance(denoiser, Experts):
            return super().remove_blocks(denoiser, names)
        for expert, module in denoiser.named_children():
            mine = [n.split(".", 1)[1] for n in names if n.split(".", 1)[0] == expert]
            super().remove_blocks(module, mine)
        return None

    def default_blocks(self, num_blocks: int, structured: bool) -> tuple[int, int]:
        """Every block (Wan has no published pruned counts to match)."""
        return (0, num_blocks)

    def cfg_mode(self, sampling: SamplingDefaults | None = None) -> str:
        return CFG_SEPARATE_CALLS if self.uses_cfg(sampling) else CFG_NONE

    def call_kwargs(self, sampling: SamplingDefaults | None = None) -> dict[str, Any]:
        """As the base, with the frames and the second expert's guidance (where set)."""
        s = sampling or self.sampling
        kwargs = super().call_kwargs(s) | {"num_frames": s.num_frames}
        if s.guidance_scale_2 is not None:
            kwargs["guidance_scale_2"] = s.guidance_scale_2
        return kwargs

    def with_latents(
        self,
        call: tuple[tuple[Any, ...], dict[str, Any]],
        latents: torch.Tensor,
        timestep: torch.Tensor,
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """As the base, the timestep rounded to the integer WanPipeline passes (its UniPC
        sampler's timesteps are integers on flow sigmas)."""
        return super().with_latents(call, latents, timestep.round().to(torch.int64))

    def vae_scale_factor(self, components: dict[str, nn.Module]) -> int:
        return int(component_config(components, "vae").scale_factor_spatial)

    def latent_channels(self, components: dict[str, nn.Module]) -> int:
        return int(component_config(components, "vae").z_dim)

    def latent_frames(self) -> int | None:
        """Latent frames of a sampled video: one, then one per 4 frames."""
        assert self.sampling.num_frames is not None
        return (self.sampling.num_frames - 1) // TEMPORAL_FACTOR + 1

    def encode_latents(self, vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) as one-frame videos (B, C, 1, h, w), or videos (B, 3, F, H, W)
        as theirs, normalised by the VAE's per-channel `latents_mean` and `latents_std` (what
        the pipeline undoes before decoding)."""
        config: Any = getattr(vae, "config")  # noqa: B009 - nn.Module types it as a Module
        videos = images if images.dim() == 5 else images[:, :, None]
        encoded = vae.encode(videos).latent_dist.mode()  # type: ignore[operator]
        mean = torch.tensor(config.latents_mean, dtype=encoded.dtype, device=encoded.device)
        std = torch.tensor(config.latents_std, dtype=encoded.dtype, device=encoded.device)
        return (encoded - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)

    def example_call(
        self, prompts: int, components: dict[str, nn.Module], device: str | torch.device = "meta"
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The latent video (B, C, F, h, w), UMT5 tokens padded to `max_sequence_length`, an
        integer timestep; one call per branch."""
        config = component_config(components, self.denoiser_attr)
        tokens = self.sampling.max_sequence_length or 512
        height, width = self.latent_size(components)
        frames = self.latent_frames()
        assert frames is not None
        dtype = self.torch_dtype
        return (), {
            "hidden_states": torch.empty(prompts, config.in_channels, frames, height, width,
                                         dtype=dtype, device=device),
            "timestep": torch.empty(prompts, dtype=torch.int64, device=device),
            "encoder_hidden_states": torch.empty(prompts, tokens, config.text_dim, dtype=dtype,
                                                 device=device),
            "attention_kwargs": None,
            "return_dict": False,
        }  # fmt: skip

    def encode_prompts(
        self, pipe: DiffusionPipeline, prompts: list[str], device: torch.device
    ) -> dict[str, torch.Tensor]:
        cfg = self.uses_cfg()
        embeds, negative = pipe.encode_prompt(
            prompt=prompts,
            negative_prompt=[self.sampling.negative_prompt or ""] * len(prompts),
            do_classifier_free_guidance=cfg,
            max_sequence_length=self.sampling.max_sequence_length or 512,
            device=device,
        )
        out = {"prompt_embeds": embeds}
        if cfg:
            out["negative_prompt_embeds"] = negative
        return out


def nearest_frames(frames: int) -> tuple[int, int]:
    """The frame counts of the form 4 k + 1 just below and above `frames`."""
    below = (frames - 1) // TEMPORAL_FACTOR * TEMPORAL_FACTOR + 1
    return below, below + TEMPORAL_FACTOR
