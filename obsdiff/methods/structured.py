"""Structured pruning of the blocks of a work unit: for every head and neuron group, the method
picks the units to drop (and, for OBS, compensates the consumers), then the block is cut
(`obsdiff.models.surgery`). Counts follow the paper: round(units * sparsity), or with
`granularity.align` the nearest count that leaves a width the kernels like."""

from __future__ import annotations

import torch

from obsdiff.methods.base import PruningMethod
from obsdiff.methods.package import Package, StructuredRecord
from obsdiff.models.structure import linear_at
from obsdiff.models.surgery import Surgery
from obsdiff.pruning.obs_structured import aligned_count


@torch.no_grad()
def prune_structured(
    method: PruningMethod, package: Package, sparsity: float, align: int | None = None
) -> list[StructuredRecord]:
    """Select, compensate and cut every group of the package; returns what each lost. With
    `align`, each group's count is rounded so the width it leaves is a multiple of it
    (`aligned_count`)."""
    records: list[StructuredRecord] = []
    for block in package.blocks:
        module, surgery = block.module, Surgery()
        for group in block.heads:
            where = block.head_units(group)
            width, head_dim, n_heads = group.width, where.unit_width, where.units
            consumers = [
                linear_at(module, n).weight.data[:, o : o + width] for n, o in group.consumers
            ]
            hessians = [package.hessian(f"{block.name}.{n}", o, width) for n, o in group.consumers]
            producers = [
                linear_at(module, n).weight.data[o : o + width] for n, o in group.producers
            ]
            new_weights, removed = method.select_heads(
                [c.float() for c in consumers],
                hessians,
                producers,
                head_dim,
                aligned_count(n_heads, sparsity, head_dim, align),
                where,
            )
            for (name, offset), weight in zip(group.consumers, new_weights, strict=True):
                target = linear_at(module, name).weight.data
                target[:, offset : offset + width] = weight.to(target.dtype)
            surgery.remove_heads(group, removed, head_dim)
            records.append(StructuredRecord(block.name, group.attention, "heads", n_heads, removed))
        for neuron_group in block.neurons:
            name, offset = neuron_group.consumer
            width = neuron_group.width
            down = linear_at(module, name).weight.data
            producers = [
                linear_at(module, n).weight.data[o : o + width] for n, o in neuron_group.producers
            ]
            new_weight, removed = method.select_neurons(
                down[:, offset : offset + width].float(),
                package.hessian(f"{block.name}.{name}", offset, width),
                producers,
                aligned_count(width, sparsity, 1, align),
                block.neuron_units(neuron_group),
            )
            down[:, offset : offset + width] = new_weight.to(down.dtype)
            surgery.remove_neurons(neuron_group, removed)
            records.append(StructuredRecord(block.name, name, "neurons", width, removed))
        surgery.apply(module)
    return records
