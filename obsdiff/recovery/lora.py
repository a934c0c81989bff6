"""LoRA for the recovery, through peft (the library diffusers uses for LoRA).

The student's block linears get rank-r adapters (`recover.lora_rank`); only the adapters train.
A sparse student's adapters keep its mask: each adapted linear computes with
W + M ⊙ (s·B·A), M its kept weights (`MaskedLoraLinear`), so the function trained is the one
merged, and the merge (peft's own `merge_and_unload`, which adds `get_delta_weight`) adds the
masked product: pruned weights stay exact zeros, and the recovered model is a plain denoiser of
the pruned shapes again. A structured student's adapters are peft's own.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn
from torch.nn import functional

from obsdiff.models.base import ModelAdapter
from obsdiff.models.structure import check_rank_fits
from obsdiff.models.surgery import LowRankLinear


class MaskedLoraLinear(LoraLinear):
    """peft's LoRA linear whose update keeps the base weight's zeros: the delta is
    M ⊙ (s·B·A), M = (W != 0) when the adapter is made, in the forward and in the merge."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, **kwargs)
        weight: torch.Tensor = base_layer.weight  # type: ignore[assignment]
        self.register_buffer("kept", weight.detach() != 0, persistent=False)  # (out, in)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        kept: torch.Tensor = self.kept  # type: ignore[assignment]
        return super().get_delta_weight(adapter) * kept  # (out, in)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base: nn.Linear = self.base_layer  # type: ignore[assignment]
        if self.disable_adapters or self.merged:
            return base(x, *args, **kwargs)
        weight = base.weight
        for name in self.active_adapters:
            if name in self.lora_A:
                delta = self.get_delta_weight(name)
                weight = weight + delta.to(weight.dtype)
        return functional.linear(x, weight, base.bias)


def lora_targets(adapter: ModelAdapter, denoiser: nn.Module) -> list[str]:
    """Every linear inside the denoiser's blocks (attention, FFN, the blocks' modulation), by
    its full name; not the two halves of a low-rank modulation linear (low rank already)."""
    blocks = {id(block) for _, block in adapter.blocks(denoiser)}
    names = []
    for prefix, block in denoiser.named_modules():
        if id(block) in blocks:
            low_rank = [f"{n}." for n, m in block.named_modules() if isinstance(m, LowRankLinear)]
            names += [
                f"{prefix}.{name}"
                for name, module in block.named_modules()
                if isinstance(module, nn.Linear) and not name.startswith(tuple(low_rank))
            ]
    return names


def check_lora_rank(denoiser: nn.Module, targets: list[str], rank: int) -> None:
    """Every target linear is at least `rank` wide (in and out); else ValueError naming the
    narrowest and the largest rank that fits (a structured prune narrows them)."""
    check_rank_fits(denoiser, targets, rank, "recover.lora_rank")


def with_lora(
    student: nn.Module, targets: list[str], rank: int, alpha: int | None, masked: bool
) -> PeftModel:
    """`student` with LoRA adapters of `rank` on `targets` (scale alpha / rank; alpha = rank
    by default), masked for a sparse student; only the adapters train. The student's modules
    are changed in place (its blocks stay the same objects)."""
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets)
    if masked:
        config._register_custom_module({nn.Linear: MaskedLoraLinear})
    model = get_peft_model(student, config)  # type: ignore[arg-type]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return model


def merged(model: PeftModel) -> nn.Module:
    """The student with its adapters merged into its weights (a sparse student's masked) and
    removed: a plain denoiser again."""
    return model.merge_and_unload()  # type: ignore[no-any-return,operator]
