"""Loaded weights in memory of their own, so that a loaded model computes what a built one does.

`from_pretrained` (diffusers and transformers, safetensors files) hands back CPU tensors that
point into the memory-mapped file, at offsets aligned to the dtype only (4 bytes for float32),
while tensors built in memory come from torch's allocator, aligned to 64 bytes. CPU matmul
kernels (MKL, oneDNN) choose their code path by the alignment of their operands, so the same
weights in the two kinds of memory give float32 results that differ in the last bits, by how
much depending on the CPU (seen: max |diff| 1e-4 in a tiny Flux's latents on an AMD EPYC with
AVX-512, none on an Intel Xeon). Copying every loaded CPU tensor into allocator memory removes the
difference on every CPU: a pipeline loaded from disk then computes bit for bit what the pipeline
that was saved computes (tests/integration/test_tiny_zoo.py checks it on every family).

Also a job's peak memory (`reset_peak_memory`, `peak_memory_bytes`): on the device for CUDA,
the resident set size on the CPU.
"""

from __future__ import annotations

import re
import resource
from pathlib import Path

import torch
from torch import nn


ALLOCATOR_ALIGNMENT = 64  # bytes: c10's CPU allocator (gAlignment)


def module_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers at their dtypes (meta tensors too)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def own_memory(module: nn.Module) -> int:
    """Copy every CPU parameter and buffer of `module` into fresh allocator memory, in place
    (one tensor at a time, so the peak is one tensor more; tied parameters stay tied, since the
    copy replaces the data of the shared Parameter). Returns the number of tensors copied."""
    copied = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type == "cpu" and tensor.numel() > 0:
            tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
            copied += 1
    return copied


def is_allocator_aligned(module: nn.Module) -> bool:
    """Every non-empty CPU tensor of `module` starts on the allocator's alignment."""
    return all(
        t.data_ptr() % ALLOCATOR_ALIGNMENT == 0
        for t in [*module.parameters(), *module.buffers()]
        if t.device.type == "cpu" and t.numel() > 0
    )


PROC_STATUS, PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> None:
    """Start a job's peak-memory count: a sweep runs its jobs in one process, whose peak would
    otherwise be the largest of every job so far."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        PROC_CLEAR_REFS.write_text("5")  # Linux: resets VmHWM, the peak resident set size
    except OSError:
        pass  # elsewhere the process's peak (ru_maxrss) is all there is


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the peak allocated on the device; CPU: the peak resident set size (VmHWM) since
    `reset_peak_memory`, or the process's where Linux's counter is not there."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        found = re.search(r"VmHWM:\s+(\d+) kB", PROC_STATUS.read_text())
    except OSError:
        found = None
    if found is not None:
        return int(found.group(1)) * 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
