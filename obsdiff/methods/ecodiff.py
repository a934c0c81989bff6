"""EcoDiff (Zhang et al., "Learnable Sparsity for Vision Generative Models", ICLR 2026) as a
baseline: a learnable gate per attention head and FFN neuron, trained end to end through the
sampler against the dense model's final latents with an L1 pull on the gates
(`obsdiff.calibration.ecodiff`), then each group's lowest-logit units removed by obsdiff's
surgery (EcoDiff's `local` binarisation: the same count in every group as every structured
method here, so comparisons are at equal parameter budgets), no compensation.

The training runs once, before the packages, on the calibration prompts (EcoDiff's 100 GCC3M
prompts: `calibration.num_prompts=100`), one batch of `calibration.batch_size` a micro-step.
Defaults are EcoDiff's SDXL configuration (its FLUX one: beta 0.01, lr_heads 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from obsdiff.methods.base import ScoredUnits
from obsdiff.methods.package import UnitGroup
from obsdiff.pruning.gates import MASKINGS


@dataclass
class EcoDiff(ScoredUnits):
    """EcoDiff's learned masks.

    Attributes:
        beta: Weight of the L1 pull on the gates (the mean gate); the start of the bisection.
        bisection_steps: Trainings at most while beta is bisected until the binarised mask
            closes as many units as the sparsity asks; 1: one training at `beta`.
        epochs: Passes over the calibration prompts per training.
        accumulate: Micro-steps (prompt batches) per optimizer step.
        lr_heads: Learning rate of the attention heads' logits.
        lr_neurons: Learning rate of the FFN neurons' logits.
        warmup_steps: Optimizer steps of linear learning-rate warm-up (then constant).
        init_logit: Every logit's start (3: a hard concrete gate fully open).
        masking: `hard_discrete` (hard concrete gates, the official default) or `sigmoid`.
        seed: Of the gates' noise and the order of the prompt batches.
    """

    name = "ecodiff"
    granularities = ("structured",)
    needs_gradients: ClassVar[bool] = True

    beta: float = 0.5
    bisection_steps: int = field(default=4, metadata={"minimum": 1})
    epochs: int = field(default=4, metadata={"minimum": 1})
    accumulate: int = field(default=4, metadata={"minimum": 1})
    lr_heads: float = 0.1
    lr_neurons: float = 0.1
    warmup_steps: int = 10
    init_logit: float = 3.0
    masking: str = "hard_discrete"
    seed: int = 44

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(
                f"method.beta={self.beta} must be > 0: the L1 pull that closes gates (EcoDiff's "
                "SDXL 0.5, FLUX 0.01)"
            )
        for key in ("bisection_steps", "epochs", "accumulate"):
            if getattr(self, key) < 1:
                raise ValueError(f"method.{key}={getattr(self, key)} must be >= 1")
        for key in ("lr_heads", "lr_neurons"):
            if not getattr(self, key) > 0:
                raise ValueError(f"method.{key}={getattr(self, key)} must be > 0; e.g. 0.1")
        if self.warmup_steps < 0:
            raise ValueError(f"method.warmup_steps={self.warmup_steps} must be >= 0")
        if self.masking not in MASKINGS:
            raise ValueError(f"method.masking={self.masking!r}; use one of {', '.join(MASKINGS)}")
        self._logits: dict[str, torch.Tensor] | None = None

    def check_counts(self, removed: int, units: int) -> None:
        """ValueError when the sparsity removes no unit of any group: no mask to learn."""
        if removed == 0:
            raise ValueError(
                f"the sparsity removes none of the {units} heads and neurons (each group's "
                "count rounds to 0), so EcoDiff's bisection has no target to reach; raise sparsity"
            )

    def use_logits(self, logits: dict[str, torch.Tensor]) -> None:
        """The trained logits by group key, which the selection reads."""
        self._logits = logits

    def unit_scores(self, where: UnitGroup) -> torch.Tensor:
        """The group's trained logits (units,)."""
        if self._logits is None:
            raise RuntimeError("ecodiff: no trained masks; prune_pipeline trains them first")
        return self._logits[where.key].detach().double().cpu()
