"""The structure a family's adapter declares: basic units (groups of linears reading one
input), the head and neuron groups structured pruning removes, and lookups of linears."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn


InputNames = tuple[str, ...]  # linears of one block (relative names) that read one input tensor
Unit = tuple[InputNames, ...]  # a basic unit: groups whose inputs do not depend on each other


@dataclass(frozen=True)
class HeadGroup:
    """Attention heads of one attention module (names relative to the block).

    `width` = heads x head width. Head h owns rows [offset + h d, offset + (h + 1) d) of every
    producer (q/k/v, add_q/k/v; a fused projection names one producer per packed slice: FLUX.2's
    `to_qkv_mlp_proj` at offsets 0, width and 2 width) and columns [offset + h d,
    offset + (h + 1) d) of every consumer (the output projections, one per stream);
    `attention` is the module whose `heads` count changes. `channel_norms`: norms over all the
    heads' channels at once (`torch.nn.RMSNorm(heads x d)`), whose weights lose the removed
    heads' channels (the kept heads' normalisation then changes: not exact, unlike per-head
    norms).
    """

    attention: str
    producers: tuple[tuple[str, int], ...]
    consumers: tuple[tuple[str, int], ...]
    width: int
    channel_norms: tuple[str, ...] = ()  # RMSNorms over every head's channels (Wan's q/k norms)


@dataclass(frozen=True)
class NeuronGroup:
    """FFN neurons: neuron i is row offset + i of each producer (both GEGLU halves) and column
    offset + i of the consumer (the down-projection); `width` neurons in all. `width_attribute`:
    (module, attribute) that stores the width where a fused layout splits by it (FLUX.2's
    `attn.mlp_hidden_dim`), kept equal to the neurons left."""

    producers: tuple[tuple[str, int], ...]
    consumer: tuple[str, int]
    width: int
    width_attribute: tuple[str, str] | None = None


def head_group(
    block: nn.Module,
    attention: str,
    producers: Sequence[str],
    consumers: Sequence[str],
    offset: int = 0,
    channel_norms: Sequence[str] = (),
) -> list[HeadGroup]:
    """[the group] restricted to the linears present, or [] when the attention is absent; the
    producers are whole linears (offset 0), the consumers read the heads from column `offset`."""
    kept_producers = tuple((name, 0) for name in producers if is_linear(block, name))
    kept_consumers = tuple((name, offset) for name in consumers if is_linear(block, name))
    if not (kept_producers and kept_consumers):
        return []
    width = linear_at(block, kept_producers[0][0]).out_features
    return [HeadGroup(attention, kept_producers, kept_consumers, width, tuple(channel_norms))]


def ffn_group(block: nn.Module, up: str, down: str, gated: bool = False) -> list[NeuronGroup]:
    """[the FFN's neurons] (a gated up-projection holds value and gate halves), or []."""
    if not (is_linear(block, up) and is_linear(block, down)):
        return []
    width = linear_at(block, down).in_features
    producers = ((up, 0), (up, width)) if gated else ((up, 0),)
    return [NeuronGroup(producers, (down, 0), width)]


def present_groups(block: nn.Module, groups: Sequence[InputNames]) -> Unit:
    """The groups restricted to the linears `block` really has (SD3's last block has no context
    output path, SD3.5-Medium has `attn2` only in its first blocks)."""
    kept = []
    for group in groups:
        names = tuple(name for name in group if is_linear(block, name))
        if names:
            kept.append(names)
    return tuple(kept)


def linear_at(module: nn.Module, name: str) -> nn.Linear:
    """The nn.Linear at `name` inside `module` (a clear error if it is something else)."""
    found = module.get_submodule(name)
    if not isinstance(found, nn.Linear):
        raise TypeError(f"{name} is a {type(found).__name__}, not an nn.Linear")
    return found


def check_rank_fits(denoiser: nn.Module, names: list[str], rank: int, key: str) -> None:
    """Every named linear is at least `rank` wide (in and out); else ValueError naming the
    setting `key`, the narrowest linear and the largest rank that fits."""
    widths = {name: min(linear_at(denoiser, name).weight.shape) for name in names}
    narrowest = min(widths, key=lambda name: widths[name])
    if rank > widths[narrowest]:
        out_features, in_features = linear_at(denoiser, narrowest).weight.shape
        raise ValueError(
            f"{key}={rank} is larger than {narrowest} ({out_features} x {in_features}); use "
            f"{key}={widths[narrowest]} or less"
        )


def is_linear(block: nn.Module, name: str) -> bool:
    try:
        return isinstance(block.get_submodule(name), nn.Linear)
    except AttributeError:
        return False


# An MMDiT joint block (SD3/SD3.5, Flux's double-stream blocks): joint attention over the image
# and text streams (q/k/v and add_q/k/v, one output projection per stream), one FFN per stream.
MMDIT_UNITS: list[list[InputNames]] = [
    [
        ("attn.to_q", "attn.to_k", "attn.to_v"),
        ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    ],
    [("attn.to_out.0",), ("attn.to_add_out",)],
    [("ff.net.0.proj",), ("ff_context.net.0.proj",)],
    [("ff.net.2",), ("ff_context.net.2",)],
]


def units_of(block: nn.Module, layout: Sequence[Sequence[InputNames]]) -> list[Unit]:
    """The basic units of `layout` that `block` holds (groups restricted to its linears)."""
    units = [present_groups(block, groups) for groups in layout]
    return [unit for unit in units if unit]


def mmdit_groups(block: nn.Module) -> tuple[list[HeadGroup], list[NeuronGroup]]:
    """The joint attention's heads (shared by both streams, one output projection each) and the
    neurons of both FFNs (GELU, not gated)."""
    producers = [name for group in MMDIT_UNITS[0] for name in group]  # q/k/v of both streams
    heads = head_group(block, "attn", producers, ["attn.to_out.0", "attn.to_add_out"])
    neurons = ffn_group(block, "ff.net.0.proj", "ff.net.2")
    neurons += ffn_group(block, "ff_context.net.0.proj", "ff_context.net.2")
    return heads, neurons


# A diffusers BasicTransformerBlock (the UNets' and PixArt's): self-attention, cross-attention
# (to_q reads the image tokens, to_k and to_v the text states: parallel), the FFN.
BASIC_BLOCK_UNITS: list[list[InputNames]] = [
    [("attn1.to_q", "attn1.to_k", "attn1.to_v")],
    [("attn1.to_out.0",)],
    [("attn2.to_q",), ("attn2.to_k", "attn2.to_v")],
    [("attn2.to_out.0",)],
    [("ff.net.0.proj",)],
    [("ff.net.2",)],
]


def basic_block_units(block: nn.Module) -> list[Unit]:
    """The basic units a BasicTransformerBlock holds."""
    return units_of(block, BASIC_BLOCK_UNITS)


def basic_block_groups(block: nn.Module, gated: bool) -> tuple[list[HeadGroup], list[NeuronGroup]]:
    """Self- and cross-attention heads (cross-attention k/v rows included) and the FFN's
    neurons (`gated`: GEGLU, value and gate halves of one projection kept together)."""
    heads = head_group(
        block, "attn1", ["attn1.to_q", "attn1.to_k", "attn1.to_v"], ["attn1.to_out.0"]
    )
    heads += head_group(
        block, "attn2", ["attn2.to_q", "attn2.to_k", "attn2.to_v"], ["attn2.to_out.0"]
    )
    return heads, ffn_group(block, "ff.net.0.proj", "ff.net.2", gated=gated)
