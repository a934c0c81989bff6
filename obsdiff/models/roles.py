"""What a denoiser is made of: its parameters by role, from its architecture alone.

Each parameter gets one role, by the module that holds it:
- modulation: the family's modulation linears (`ModelAdapter.modulation_linears`: the AdaLN
  projections of the conditioning vector, in the blocks and the final norm);
- ffn: the blocks' feed-forward networks (`ModelAdapter.is_ffn`);
- attention: the blocks' attention modules (a name part starting with `attn`: projections and
  their q/k norms);
- embeddings: the patch, position, timestep, text and guidance embedders (a name part holding
  `emb`, PixArt's `caption_projection`, a UNet's `conv_in`);
- rest: everything else (norms, the final projection, a UNet's convolutions and resnets).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from obsdiff.models.base import ModelAdapter


ROLES = ("attention", "ffn", "modulation", "embeddings", "rest")
EMBEDDERS = ("caption_projection", "conv_in")


@dataclass(frozen=True)
class ParameterRoles:
    """Parameters of a denoiser by role (`ROLES`); `block_modulation`: the modulation's inside
    the blocks (without the final norm's)."""

    counts: dict[str, int]
    block_modulation: int

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def share(self, role: str) -> float:
        return self.counts[role] / self.total if self.total else 0.0


def role_of(adapter: ModelAdapter, name: str, modulation: list[str]) -> str:
    """The role of parameter `name` (see the module docstring)."""
    if any(name.startswith(f"{linear}.") for linear in modulation):
        return "modulation"
    parts = name.split(".")[:-1]  # the modules that hold it
    if adapter.is_ffn(name):
        return "ffn"
    if any(part.startswith("attn") for part in parts):
        return "attention"
    if any("emb" in part or part in EMBEDDERS for part in parts):
        return "embeddings"
    return "rest"


def parameter_roles(adapter: ModelAdapter, denoiser: nn.Module) -> ParameterRoles:
    """The denoiser's parameters counted by role (a skeleton on the meta device will do)."""
    modulation = adapter.modulation_linears(denoiser)
    blocks = [name for name, _ in adapter.blocks(denoiser)]
    counts = dict.fromkeys(ROLES, 0)
    in_blocks = 0
    for name, parameter in denoiser.named_parameters():
        role = role_of(adapter, name, modulation)
        counts[role] += parameter.numel()
        if role == "modulation" and any(name.startswith(f"{block}.") for block in blocks):
            in_blocks += parameter.numel()
    return ParameterRoles(counts, in_blocks)
