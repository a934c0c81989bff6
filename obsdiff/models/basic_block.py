"""Families whose blocks are diffusers BasicTransformerBlocks (the UNets, PixArt): one layout
(`structure.basic_block_units` and `basic_block_groups`), every block pruned by default."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from obsdiff.models.base import ModelAdapter
from obsdiff.models.structure import (
    HeadGroup,
    NeuronGroup,
    Unit,
    basic_block_groups,
    basic_block_units,
)


class BasicBlockAdapter(ModelAdapter):
    """Self-attention, cross-attention and an FFN per block; `gated_ffn`: GEGLU (value and gate
    halves of one projection kept together) rather than GELU."""

    gated_ffn: ClassVar[bool]

    def block_units(self, block: nn.Module) -> list[Unit]:
        return basic_block_units(block)

    def structured_groups(self, block: nn.Module) -> tuple[list[HeadGroup], list[NeuronGroup]]:
        """Self- and cross-attention heads and the FFN's neurons."""
        return basic_block_groups(block, gated=self.gated_ffn)

    def default_blocks(self, num_blocks: int, structured: bool) -> tuple[int, int]:
        """Every block (the released SDXL checkpoints' parameter counts; PixArt has no
        published pruned counts to match)."""
        return (0, num_blocks)
