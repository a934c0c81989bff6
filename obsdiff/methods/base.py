"""The method contract: which statistics a method needs and how it prunes groups of layers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from obsdiff.methods.granularity import GRANULARITY_OPTIONS
from obsdiff.pruning.patterns import Pattern
from obsdiff.pruning.statistics import InputStatistics


@dataclass
class GroupJob:
    """Linears (qualified names) that read one input, with that input's statistics."""

    names: list[str]
    modules: list[nn.Linear]
    stats: InputStatistics | None
    ffn: list[bool] = field(default_factory=list)  # per linear: part of a feed-forward network

    def is_ffn(self, index: int) -> bool:
        return bool(self.ffn) and self.ffn[index]


@dataclass
class LayerRecord:
    """What pruning did to one linear."""

    name: str
    shape: tuple[int, ...]
    pruned: int
    loss: float | None = None

    @property
    def sparsity(self) -> float:
        return self.pruned / (self.shape[0] * self.shape[1])

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "pruned": self.pruned,
            "sparsity": self.sparsity,
            "loss": self.loss,
        }


def write_weight(module: nn.Linear, weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Store a pruned weight in the module's dtype; pruned entries are exact zeros."""
    module.weight.data.copy_(weight.to(module.weight.dtype).masked_fill(mask, 0))


class PruningMethod(ABC):
    """A pruning method; its YAML in conf/method/ names the subclass and its parameters."""

    name: ClassVar[str]
    granularities: ClassVar[tuple[str, ...]]  # kinds of obsdiff.methods.Granularity
    needs_hessian: ClassVar[bool] = False
    needs_moments: ClassVar[bool] = False

    @property
    def needs_calibration(self) -> bool:
        return self.needs_hessian or self.needs_moments

    def check_granularity(self, kind: str) -> None:
        if kind not in self.granularities:
            options = [o for k in self.granularities for o in GRANULARITY_OPTIONS[k]]
            raise ValueError(
                f"method {self.name!r} does not support {kind} pruning; with method="
                f"{self.name} use granularity={' or '.join(options)}"
            )

    def describe(self) -> dict[str, Any]:
        """The method's name and parameters (every method is a dataclass)."""
        params = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        return {"name": self.name, **params}

    @abstractmethod
    def prune_groups(self, groups: list[GroupJob], pattern: Pattern) -> list[LayerRecord]:
        """Prune every linear of `groups` in place (one package) and report what was done."""

    def select_heads(
        self,
        consumers: list[torch.Tensor],
        hessians: list[torch.Tensor | None],
        producers: list[torch.Tensor],
        head_dim: int,
        count: int,
    ) -> tuple[list[torch.Tensor], list[int]]:
        """Structured: which `count` heads go, and the consumers' new weights (columns of the
        heads' range, (rows, heads * head_dim) each). Producers are (heads * head_dim, in)."""
        raise ValueError(f"method {self.name!r} does not support structured pruning")

    def select_neurons(
        self,
        consumer: torch.Tensor,
        hessian: torch.Tensor | None,
        producers: list[torch.Tensor],
        count: int,
    ) -> tuple[torch.Tensor, list[int]]:
        """Structured: which `count` FFN neurons go, and the down-projection's new weight
        ((rows, width)). Producers are the (width, in) row blocks of the up-projection(s)."""
        raise ValueError(f"method {self.name!r} does not support structured pruning")
