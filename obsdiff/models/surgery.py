"""Structured surgery: physically remove attention heads and FFN neurons, count what is left.

A `Surgery` collects, for one block, the rows and columns (original indices) to drop from each
linear and the heads each attention module loses; `apply` replaces the linears by smaller ones and
updates the `heads` counts, so the smaller model runs through the unchanged diffusers pipeline.
`shapes` / `restore_shapes` record and rebuild the result for loading saved weights.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from obsdiff.models.structure import HeadGroup, NeuronGroup, linear_at


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[child] = new


def shrunk_linear(
    linear: nn.Linear, keep_rows: torch.Tensor, keep_columns: torch.Tensor
) -> nn.Linear:
    """A new nn.Linear holding the kept rows (outputs) and columns (inputs) of `linear`."""
    new = nn.Linear(
        len(keep_columns),
        len(keep_rows),
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(linear.weight[keep_rows][:, keep_columns])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[keep_rows])  # type: ignore[union-attr]
    return new.train(linear.training)


class LowRankLinear(nn.Module):
    """A linear of rank `rank`: y = up(down(x)), `down` (rank x in, no bias) then `up`
    (out x rank, the original bias). Two smaller linears in place of one; the pipeline calls it
    as it called the linear (`in_features`, `out_features` as nn.Linear has them)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))  # (..., in) -> (..., rank) -> (..., out)

    def dense_weight(self) -> torch.Tensor:
        """The product up @ down: the (out, in) weight of the equivalent nn.Linear."""
        return self.up.weight @ self.down.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def factorised_linear(linear: nn.Linear, up: torch.Tensor, down: torch.Tensor) -> LowRankLinear:
    """`linear` as a `LowRankLinear` holding `up` (out, r) and `down` (r, in), with its bias."""
    weight = linear.weight
    new = LowRankLinear(
        linear.in_features, linear.out_features, down.shape[0], linear.bias is not None,
        weight.device, weight.dtype,
    )  # fmt: skip
    with torch.no_grad():
        new.up.weight.copy_(up)
        new.down.weight.copy_(down)
        if linear.bias is not None:
            new.up.bias.copy_(linear.bias)  # type: ignore[union-attr]
    return new.train(linear.training)


def expand_low_rank(denoiser: nn.Module) -> int:
    """Every `LowRankLinear` of `denoiser` replaced, in place, by the nn.Linear of its product
    (up @ down, computed in float32, stored in its dtype) and its bias: the same function at the
    dense size, a layout plain diffusers loads. Returns how many were expanded."""
    found = [(n, m) for n, m in denoiser.named_modules() if isinstance(m, LowRankLinear)]
    for name, low in found:
        weight = low.up.weight
        dense = nn.Linear(
            low.in_features, low.out_features, bias=low.up.bias is not None,
            device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        with torch.no_grad():
            dense.weight.copy_(low.up.weight.float() @ low.down.weight.float())
            if low.up.bias is not None:
                dense.bias.copy_(low.up.bias)  # type: ignore[union-attr]
        replace_submodule(denoiser, name, dense.train(low.training))
    return len(found)


@dataclass
class Surgery:
    """Removals for one block, in original indices."""

    rows: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    columns: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    heads: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    widths: dict[tuple[str, str], int] = field(default_factory=dict)  # (module, attribute)
    norm_channels: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))

    def remove_heads(self, group: HeadGroup, removed: list[int], head_dim: int) -> None:
        for head in removed:
            span = range(head * head_dim, (head + 1) * head_dim)
            for name, offset in group.producers:
                self.rows[name].update(offset + i for i in span)
            for name, offset in group.consumers:
                self.columns[name].update(offset + i for i in span)
            for name in group.channel_norms:
                self.norm_channels[name].update(span)
        self.heads[group.attention] += len(removed)

    def remove_neurons(self, group: NeuronGroup, removed: list[int]) -> None:
        for name, offset in group.producers:
            self.rows[name].update(offset + i for i in removed)
        name, offset = group.consumer
        self.columns[name].update(offset + i for i in removed)
        if group.width_attribute is not None:
            self.widths[group.width_attribute] = group.width - len(removed)

    def apply(self, block: nn.Module) -> None:
        for name in sorted(set(self.rows) | set(self.columns)):
            linear = linear_at(block, name)
            device = linear.weight.device
            keep_rows = [i for i in range(linear.out_features) if i not in self.rows.get(name, ())]
            keep_cols = [
                i for i in range(linear.in_features) if i not in self.columns.get(name, ())
            ]
            new = shrunk_linear(
                linear,
                torch.tensor(keep_rows, device=device),
                torch.tensor(keep_cols, device=device),
            )
            replace_submodule(block, name, new)
        for attention, removed in self.heads.items():
            module = block.get_submodule(attention)
            set_heads(module, int(module.heads) - removed)  # type: ignore[arg-type]
        for (module_name, attribute), width in self.widths.items():
            setattr(block.get_submodule(module_name), attribute, width)
        for name, channels in self.norm_channels.items():
            norm = block.get_submodule(name)
            kept = [i for i in range(norm_width(norm)) if i not in channels]
            replace_submodule(block, name, shrunk_norm(norm, kept))


# widths a fused layout splits its linears by (FLUX.2's parallel attention-MLP blocks), kept
# equal to the neurons left by structured pruning (`NeuronGroup.width_attribute`)
WIDTH_ATTRIBUTES = ("mlp_hidden_dim",)


def norm_width(norm: nn.Module) -> int:
    """The channels a `torch.nn.RMSNorm` over one dimension normalises."""
    assert isinstance(norm, nn.RMSNorm) and len(norm.normalized_shape) == 1, norm
    return int(norm.normalized_shape[0])


def shrunk_norm(norm: nn.Module, kept: list[int]) -> nn.RMSNorm:
    """A new `torch.nn.RMSNorm` over the `kept` channels of `norm`, with their weights."""
    assert isinstance(norm, nn.RMSNorm)
    weight = norm.weight
    new = nn.RMSNorm(
        len(kept), eps=norm.eps, elementwise_affine=weight is not None,
        device=None if weight is None else weight.device,
        dtype=None if weight is None else weight.dtype,
    )  # fmt: skip
    if weight is not None:
        with torch.no_grad():
            new.weight.copy_(weight[torch.tensor(kept, device=weight.device)])
    return new.train(norm.training)


def shapes(denoiser: nn.Module) -> dict[str, Any]:
    """Every linear's (out, in), every attention's head count, every low-rank linear's rank and
    every stored width of a fused layout, to rebuild a pruned denoiser."""
    return {
        "norms": {
            name: norm_width(m)
            for name, m in denoiser.named_modules()
            if isinstance(m, nn.RMSNorm) and len(m.normalized_shape) == 1
        },
        "widths": {
            f"{name}.{attribute}": getattr(m, attribute)
            for name, m in denoiser.named_modules()
            for attribute in WIDTH_ATTRIBUTES
            if isinstance(getattr(m, attribute, None), int)
        },
        "low_rank": {
            name: m.rank for name, m in denoiser.named_modules() if isinstance(m, LowRankLinear)
        },
        "linears": {
            name: [m.out_features, m.in_features]
            for name, m in denoiser.named_modules()
            if isinstance(m, nn.Linear)
        },
        "heads": {
            name: int(m.heads)  # type: ignore[arg-type]
            for name, m in denoiser.named_modules()
            if isinstance(getattr(m, "heads", None), int)
        },
    }


def restore_shapes(denoiser: nn.Module, recorded: dict[str, Any]) -> None:
    """Resize the base denoiser's linears and head counts to a recorded structure (weights are
    then loaded with `load_state_dict`): low-rank linears first (their two linears are then
    among the recorded ones)."""
    for name, rank in recorded.get("low_rank", {}).items():
        if not isinstance(denoiser.get_submodule(name), LowRankLinear):
            linear = linear_at(denoiser, name)
            weight = linear.weight
            low = LowRankLinear(
                linear.in_features, linear.out_features, rank, linear.bias is not None,
                weight.device, weight.dtype,
            )  # fmt: skip
            replace_submodule(denoiser, name, low.train(linear.training))
    for name, (out_features, in_features) in recorded["linears"].items():
        linear = linear_at(denoiser, name)
        if (linear.out_features, linear.in_features) != (out_features, in_features):
            rows = torch.arange(out_features, device=linear.weight.device)
            columns = torch.arange(in_features, device=linear.weight.device)
            replace_submodule(denoiser, name, shrunk_linear(linear, rows, columns))
    for name, heads in recorded["heads"].items():
        set_heads(denoiser.get_submodule(name), heads)
    for name, width in recorded.get("norms", {}).items():
        norm = denoiser.get_submodule(name)
        if norm_width(norm) != width:
            replace_submodule(denoiser, name, shrunk_norm(norm, list(range(width))))
    for qualified, width in recorded.get("widths", {}).items():
        name, _, attribute = qualified.rpartition(".")
        setattr(denoiser.get_submodule(name), attribute, width)


def set_heads(attention: nn.Module, heads: int) -> None:
    """An attention module's head count set to `heads`, with the widths it derives from it
    (diffusers' `Attention.inner_dim` and `inner_kv_dim`: Qwen-Image's processor reads its head
    width as `inner_dim // heads`, FLUX.2's splits its fused projection by `inner_dim`) scaled
    to match."""
    old = int(attention.heads)  # type: ignore[arg-type]
    for width in ("inner_dim", "inner_kv_dim"):
        value = getattr(attention, width, None)
        if isinstance(value, int) and old and value % old == 0:
            setattr(attention, width, value // old * heads)
    attention.heads = heads  # type: ignore[assignment]
