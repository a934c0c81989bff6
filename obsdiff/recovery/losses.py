"""The distillation losses: the student's prediction against the teacher's, and every block's
outputs, each token L2-normalised (PPCL), optionally without the tokens of massive activation
(TinyFusion)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def feature_tensors(output: Any) -> list[torch.Tensor]:
    """The floating tensors of a block's output with a token axis (B, N, C) or a feature map:
    both streams of an MMDiT block."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() and output.ndim >= 3 else []
    if isinstance(output, tuple | list):
        return [t for item in output for t in feature_tensors(item)]
    return []


@contextmanager
def block_outputs(blocks: list[nn.Module]) -> Iterator[list[list[torch.Tensor]]]:
    """The outputs of `blocks` in the forward pass run inside the block: one list per block,
    filled by forward hooks (cleared by the caller before each pass)."""
    found: list[list[torch.Tensor]] = [[] for _ in blocks]
    handles = []
    for index, block in enumerate(blocks):

        def keep(module: nn.Module, args: Any, output: Any, index: int = index) -> None:
            found[index] = feature_tensors(output)

        handles.append(block.register_forward_hook(keep))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def _tokens(feature: torch.Tensor) -> torch.Tensor:
    """(B, N, C) tokens of a feature: as it is, or a feature map (B, C, H, W) flattened."""
    if feature.ndim == 4:
        return feature.flatten(2).transpose(1, 2)
    return feature.reshape(feature.shape[0], -1, feature.shape[-1])


def feature_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], massive_sigma: float | None
) -> torch.Tensor:
    """Mean over the tensors of MSE(student, teacher), each token L2-normalised over its
    channels; tokens where the teacher's activation lies more than `massive_sigma` standard
    deviations from the tensor's mean are left out (None: none)."""
    losses = []
    for s, t in zip(student, teacher, strict=True):
        s_tokens, t_tokens = _tokens(s).float(), _tokens(t).float()  # (B, N, C)
        s_unit = nn.functional.normalize(s_tokens, dim=-1)
        t_unit = nn.functional.normalize(t_tokens, dim=-1)
        error = (s_unit - t_unit).pow(2).mean(dim=-1)  # (B, N)
        if massive_sigma is not None:
            centred = (t_tokens - t_tokens.mean()).abs().amax(dim=-1)  # (B, N)
            keep = centred <= massive_sigma * t_tokens.std()
            error = error[keep] if keep.any() else error
        losses.append(error.mean())
    return torch.stack(losses).mean()
