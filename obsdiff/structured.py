"""Structured pruning of one package: for every head and neuron group whose consumers the package
holds, the method picks the units to drop (and, for OBS, compensates the consumers), then the
block is cut (`obsdiff.surgery`). Counts follow the paper: round(units * sparsity)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from obsdiff.calibration.packages import UnitRef
from obsdiff.methods.base import GroupJob, PruningMethod
from obsdiff.models.base import ModelAdapter, linear_at
from obsdiff.pruning.obs_structured import structured_count
from obsdiff.surgery import Surgery


@dataclass
class StructuredRecord:
    """Units one group lost."""

    block: str
    group: str  # the attention module, or the FFN down-projection
    kind: str  # "heads" or "neurons"
    before: int
    removed: list[int]

    def as_dict(self) -> dict[str, Any]:
        return {
            "block": self.block,
            "group": self.group,
            "kind": self.kind,
            "before": self.before,
            "removed": self.removed,
        }


def _hessian(
    stats_by_name: dict[str, GroupJob], name: str, offset: int, width: int
) -> torch.Tensor | None:
    job = stats_by_name.get(name)
    if job is None or job.stats is None:
        return None
    return job.stats.hessian_matrix()[offset : offset + width, offset : offset + width]


@torch.no_grad()
def prune_structured_package(
    adapter: ModelAdapter,
    denoiser: nn.Module,
    package: list[UnitRef],
    jobs: list[GroupJob],
    method: PruningMethod,
    sparsity: float,
) -> list[StructuredRecord]:
    """Select, compensate and cut every group of the package; returns what each lost."""
    in_package = {name for unit in package for name in unit.module_names}
    by_name = {job.names[0]: job for job in jobs}
    records: list[StructuredRecord] = []
    for block_name in dict.fromkeys(unit.block_name for unit in package):
        block = denoiser.get_submodule(block_name)
        heads, neurons = adapter.structured_groups(block)
        surgery = Surgery()
        for group in heads:
            qualified = [f"{block_name}.{name}" for name, _ in group.consumers]
            if not all(name in in_package for name in qualified):
                continue
            n_heads = int(block.get_submodule(group.attention).heads)  # type: ignore[arg-type]
            head_dim = linear_at(block, group.producers[0]).out_features // n_heads
            width = n_heads * head_dim
            consumers = [
                linear_at(block, n).weight.data[:, o : o + width] for n, o in group.consumers
            ]
            hessians = [
                _hessian(by_name, q, o, width)
                for q, (_, o) in zip(qualified, group.consumers, strict=True)
            ]
            producers = [linear_at(block, n).weight.data for n in group.producers]
            new_weights, removed = method.select_heads(
                [c.float() for c in consumers],
                hessians,
                producers,
                head_dim,
                structured_count(n_heads, sparsity),
            )
            for (name, offset), weight in zip(group.consumers, new_weights, strict=True):
                target = linear_at(block, name).weight.data
                target[:, offset : offset + width] = weight.to(target.dtype)
            surgery.remove_heads(group, removed, head_dim)
            records.append(StructuredRecord(block_name, group.attention, "heads", n_heads, removed))
        for neuron_group in neurons:
            name, offset = neuron_group.consumer
            if f"{block_name}.{name}" not in in_package:
                continue
            width = neuron_group.width
            down = linear_at(block, name).weight.data
            producers = [
                linear_at(block, n).weight.data[o : o + width] for n, o in neuron_group.producers
            ]
            new_weight, removed = method.select_neurons(
                down[:, offset : offset + width].float(),
                _hessian(by_name, f"{block_name}.{name}", offset, width),
                producers,
                structured_count(width, sparsity),
            )
            down[:, offset : offset + width] = new_weight.to(down.dtype)
            surgery.remove_neurons(neuron_group, removed)
            records.append(StructuredRecord(block_name, name, "neurons", width, removed))
        surgery.apply(block)
    return records
