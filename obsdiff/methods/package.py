"""What a method receives and returns for one package: the same types at every granularity.

A `Package` holds its input groups (the linears that read one input, with that input's
statistics) and, for structured pruning, the head and neuron groups of its blocks whose consumers
it holds. A method prunes it towards a `Target` (an unstructured or N:M pattern, or `Structured`)
and returns one record per linear (`LayerRecord`) or per head/neuron group (`StructuredRecord`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from obsdiff.models.structure import HeadGroup, NeuronGroup
from obsdiff.pruning.patterns import Pattern, check_sparsity
from obsdiff.pruning.statistics import InputStatistics


@dataclass(frozen=True)
class Structured:
    """Remove round(units x sparsity) attention heads and FFN neurons of every group; with
    `align`, the nearest count that leaves a multiple of `align` channels."""

    sparsity: float
    align: int | None = None

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)


@dataclass(frozen=True)
class Depth:
    """Remove round(blocks x sparsity) whole blocks (`obsdiff.methods.depth`)."""

    sparsity: float

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)


Target = Pattern | Structured | Depth


@dataclass
class InputGroup:
    """Linears (qualified names) that read one input, with that input's statistics."""

    names: list[str]
    modules: list[nn.Linear]
    stats: InputStatistics | None
    ffn: list[bool] = field(default_factory=list)  # per linear: part of a feed-forward network

    def is_ffn(self, index: int) -> bool:
        return bool(self.ffn) and self.ffn[index]

    @property
    def shape(self) -> tuple[int, int]:
        """(inputs, stacked outputs): the size of the group's solve."""
        return self.modules[0].in_features, sum(m.out_features for m in self.modules)

    def cost(self) -> float:
        """The work of solving the group, about n^3 + rows n^2 (factorisation and updates)."""
        n, rows = self.shape
        return float(n**3 + rows * n**2)

    def local(self) -> InputGroup:
        """The group with its statistics on its linears' device (a copy when offloaded)."""
        if self.stats is None:
            return self
        return replace(self, stats=self.stats.to(self.modules[0].weight.device))


@dataclass(frozen=True)
class UnitGroup:
    """A head or neuron group as a structured method sees it, in the denoiser's names.

    `key`: the group's name in its `StructuredRecord` (`<block>.<attention>` for heads,
    `<block>.<down-projection>` for neurons). Unit u is rows [o + u w, o + (u + 1) w) of each
    producer and columns [o + u w, o + (u + 1) w) of each consumer, (qualified linear name, o)
    each, w = `unit_width` (a head's width, 1 for a neuron); `width` channels in all."""

    key: str
    kind: str  # "heads" or "neurons"
    producers: tuple[tuple[str, int], ...]
    consumers: tuple[tuple[str, int], ...]
    width: int
    unit_width: int

    @property
    def units(self) -> int:
        return self.width // self.unit_width


@dataclass
class StructuredBlock:
    """One block's head and neuron groups whose consumers all lie in the package."""

    name: str
    module: nn.Module
    heads: list[HeadGroup]
    neurons: list[NeuronGroup]

    def head_units(self, group: HeadGroup) -> UnitGroup:
        """A head group of this block in the denoiser's names; its heads as the attention
        module counts them now."""
        heads = int(self.module.get_submodule(group.attention).heads)  # type: ignore[arg-type]
        return UnitGroup(
            f"{self.name}.{group.attention}",
            "heads",
            tuple((f"{self.name}.{n}", o) for n, o in group.producers),
            tuple((f"{self.name}.{n}", o) for n, o in group.consumers),
            group.width,
            group.width // heads,
        )

    def neuron_units(self, group: NeuronGroup) -> UnitGroup:
        """A neuron group of this block in the denoiser's names."""
        name, offset = group.consumer
        return UnitGroup(
            f"{self.name}.{name}",
            "neurons",
            tuple((f"{self.name}.{n}", o) for n, o in group.producers),
            ((f"{self.name}.{name}", offset),),
            group.width,
            1,
        )

    def unit_groups(self) -> list[UnitGroup]:
        """Every head group, then every neuron group."""
        return [self.head_units(g) for g in self.heads] + [
            self.neuron_units(g) for g in self.neurons
        ]


@dataclass
class Package:
    groups: list[InputGroup]
    blocks: list[StructuredBlock] = field(default_factory=list)  # structured pruning only

    def cost(self) -> float:
        return sum(g.cost() for g in self.groups)

    def local(self) -> Package:
        """The package with its statistics on its linears' device (`InputGroup.local`)."""
        return Package([g.local() for g in self.groups], self.blocks)

    def block_part(self, block: StructuredBlock) -> Package:
        """The input groups of one of its blocks, with that block."""
        prefix = f"{block.name}."
        return Package([g for g in self.groups if g.names[0].startswith(prefix)], [block])

    def hessian(self, name: str, offset: int, width: int) -> torch.Tensor | None:
        """The (width, width) block of the Hessian of the input read by linear `name`, from
        input column `offset` (None without statistics)."""
        group = next((g for g in self.groups if g.names[0] == name), None)
        if group is None or group.stats is None:
            return None
        return group.stats.hessian_matrix()[offset : offset + width, offset : offset + width]


@dataclass
class LayerRecord:
    """What pruning did to one linear (unstructured and N:M)."""

    type: ClassVar[str] = "layer"
    name: str
    shape: tuple[int, ...]
    pruned: int
    loss: float | None = None

    @property
    def sparsity(self) -> float:
        return self.pruned / (self.shape[0] * self.shape[1])

    @property
    def units(self) -> tuple[int, int]:
        """(pruned, total): weights."""
        return self.pruned, self.shape[0] * self.shape[1]

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            **asdict(self),
            "shape": list(self.shape),
            "sparsity": self.sparsity,
        }


@dataclass
class StructuredRecord:
    """Units one head or neuron group lost."""

    type: ClassVar[str] = "structured"
    block: str
    group: str  # the attention module, or the FFN down-projection
    kind: str  # "heads" or "neurons"
    before: int
    removed: list[int]

    @property
    def units(self) -> tuple[int, int]:
        """(pruned, total): heads or neurons."""
        return len(self.removed), self.before

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, **asdict(self)}


@dataclass
class LowRankRecord:
    """A modulation linear replaced by two of rank `rank` (`obsdiff.methods.modulation`)."""

    type: ClassVar[str] = "low_rank"
    name: str
    shape: tuple[int, ...]  # (out, in)
    rank: int
    energy: float  # the share of the weighted output energy the rank keeps

    @property
    def parameters_saved(self) -> int:
        """Weights the two linears hold fewer than the one they replace."""
        out_features, in_features = self.shape
        if self.rank >= min(out_features, in_features):  # left whole
            return 0
        return out_features * in_features - self.rank * (out_features + in_features)

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, **asdict(self), "shape": list(self.shape)}


@dataclass
class BlockRecord:
    """One block under depth pruning: its criterion's score (None: not a candidate) and
    whether it went."""

    type: ClassVar[str] = "block"
    name: str
    score: float | None
    removed: bool

    @property
    def units(self) -> tuple[int, int]:
        """(pruned, total): this block."""
        return int(self.removed), 1

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, **asdict(self)}


PruneRecord = LayerRecord | StructuredRecord | BlockRecord
Record = PruneRecord | LowRankRecord


def record_from_dict(data: dict[str, Any]) -> Record:
    """The record `as_dict` wrote (records of checkpoints before the `type` key: by their keys)."""
    kind = data.get("type") or ("structured" if "removed" in data else "layer")
    if kind == BlockRecord.type:
        return BlockRecord(data["name"], data["score"], data["removed"])
    if kind == LowRankRecord.type:
        return LowRankRecord(data["name"], tuple(data["shape"]), data["rank"], data["energy"])
    if kind == StructuredRecord.type:
        return StructuredRecord(
            data["block"], data["group"], data["kind"], data["before"], data["removed"]
        )
    return LayerRecord(data["name"], tuple(data["shape"]), data["pruned"], data["loss"])


def achieved_sparsity(records: list[Record]) -> float:
    """Pruned units over all units of the records: weights of the target linears (unstructured,
    N:M), or heads and neurons of the pruned groups (structured); low-rank modulation is not
    part of it."""
    units = [r.units for r in records if not isinstance(r, LowRankRecord)]
    pruned = sum(u[0] for u in units)
    total = sum(u[1] for u in units)
    return pruned / total if total else 0.0


def write_weight(module: nn.Linear, weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Store a pruned weight in the module's dtype; pruned entries are exact zeros."""
    module.weight.data.copy_(weight.to(module.weight.dtype).masked_fill(mask, 0))
