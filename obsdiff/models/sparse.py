"""2:4 sparse kernels for inference: every 2:4-pruned linear's weight as a semi-structured sparse
tensor (`torch.sparse.to_sparse_semi_structured`: cuSPARSELt or CUTLASS on CUDA, fp16/bf16).

The kernels exist on NVIDIA GPUs of compute capability 8.0 and above, for float16 and bfloat16,
and only for some shapes; a speed-up is shape- and GPU-dependent (slower than dense on some
Hopper cards, see the README's "Deploy"), so this is an option to measure, not a default.
`check_sparse_kernels` says what is missing before any model is loaded; `use_sparse_kernels`
converts what it can and logs why it skipped the rest (a linear that is not 2:4, a shape the
kernels refuse).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn


log = logging.getLogger(__name__)

SPARSE_DTYPES = (torch.float16, torch.bfloat16)


class SparseKernelError(ValueError):
    """2:4 kernels cannot run here, or not on this model."""


def check_sparse_kernels(granularity: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """Raise one SparseKernelError naming what is missing: a 2:4 model (`granularity`
    semi_2_4), a CUDA device of compute capability >= 8.0, a float16 or bfloat16 model."""
    if granularity != "semi_2_4":
        raise SparseKernelError(
            f"sparse kernels need a 2:4-pruned model; this one is {granularity} (prune with "
            "granularity=semi_2_4, or load it without sparse_kernels)"
        )
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise SparseKernelError(
            f"sparse kernels run on CUDA only (2:4 semi-structured sparsity); device={device}: "
            "load on a CUDA device (device='cuda'), or without sparse_kernels"
        )
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise SparseKernelError(
            f"2:4 sparse kernels need a GPU of compute capability 8.0 or above; this one is "
            f"{major}.{minor}"
        )
    if dtype not in SPARSE_DTYPES:
        raise SparseKernelError(
            f"2:4 sparse kernels take float16 or bfloat16 weights; the model is {dtype}: set "
            "model.dtype=float16 (or bfloat16)"
        )


def is_two_four(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive inputs of every row."""
    rows, columns = weight.shape
    if columns % 4:
        return False
    groups = weight.reshape(rows, columns // 4, 4)  # (rows, groups, 4)
    return bool(((groups != 0).sum(-1) <= 2).all())


@dataclass
class SparseReport:
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # linear: why


def use_sparse_kernels(denoiser: nn.Module, names: list[str]) -> SparseReport:
    """Turn the linears `names` of `denoiser` (on CUDA, fp16/bf16) into semi-structured sparse
    weights where they are 2:4 and the kernels accept their shape; the others stay dense."""
    from torch.sparse import to_sparse_semi_structured

    report = SparseReport()
    for name in names:
        module = denoiser.get_submodule(name)
        if not isinstance(module, nn.Linear):
            report.skipped[name] = "not a linear"
            continue
        weight = module.weight.detach()
        if not is_two_four(weight):
            report.skipped[name] = "not 2:4"
            continue
        try:
            sparse = to_sparse_semi_structured(weight)
        except (RuntimeError, ValueError) as err:  # the kernels' shape and dtype rules
            report.skipped[name] = f"refused by the kernels: {str(err).splitlines()[0]}"
            continue
        module.weight = nn.Parameter(sparse, requires_grad=False)
        report.converted.append(name)
    for name, why in report.skipped.items():
        log.info("sparse kernels: %s stays dense (%s)", name, why)
    log.info(
        "sparse kernels: %d of %d linears converted to 2:4 semi-structured weights",
        len(report.converted),
        len(names),
    )
    return report
