"""Fully sharded recovery (`runner=fsdp`): FSDP2 (`torch.distributed.fsdp.fully_shard`), for
models whose teacher, student, gradients and AdamW state do not fit one device (the recovery's
memory plan says when).

Each block of a denoiser is one FSDP unit, the rest (embedders, final norm and projection) the
root's: a rank holds 1/world of every weight, gradient and optimizer moment, and gathers one
block's weights while that block runs. The teacher is sharded as the student is (it only runs
forward). FSDP's reduce-scatter averages the gradients over the ranks, so a step is DDP's step,
the same weights as one process accumulating `world_size` times more, to float round-off. The
mask of a sparse student is sharded like its weight (`sharded_like`); the checkpoint gathers full
tensors (`obsdiff.recovery.checkpoint`); at the end every rank gathers the full weights into a
plain denoiser (`gather_into`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def device_mesh(device: torch.device, world_size: int) -> DeviceMesh:
    """The ranks of the initialised process group as one flat mesh of `device`'s type."""
    return init_device_mesh(device.type, (world_size,))


def shard(module: nn.Module, blocks: list[nn.Module], mesh: DeviceMesh) -> None:
    """`module` fully sharded over `mesh`, in place: each of its `blocks` an FSDP unit, then
    the rest. A block still on the CPU goes to the mesh's device one at a time, so no device
    ever holds more than one whole block."""
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)


def sharded_like(tensor: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """`tensor` (the shape of `parameter`, whole) placed as `parameter` is: this rank's shard
    of a sharded parameter, the whole tensor on its device otherwise."""
    if isinstance(parameter, DTensor):
        local = tensor.to(parameter.to_local().device)
        return distribute_tensor(local, parameter.device_mesh, parameter.placements)
    return tensor.to(parameter.device)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a (possibly sharded) tensor, on the CPU; a sharded one is gathered, a
    collective every rank calls in the same order."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu()


def gather_into(sharded: nn.Module, plain: nn.Module) -> nn.Module:
    """`plain` (a module of `sharded`'s structure, not sharded) holding `sharded`'s full weights,
    on the CPU, on every rank: one tensor gathered at a time."""
    plain.load_state_dict({name: full_tensor(t) for name, t in sharded.state_dict().items()})
    return plain
