"""Learnable unit gates (EcoDiff's masks): one logit per attention head or FFN neuron, turned
into a gate in [0, 1] that scales the unit's output.

`hard_discrete` is the hard concrete gate of Louizos et al. (2018), as EcoDiff's
`hard_concrete_distribution` with its constants: while training, a logistic sample sharpened by
the temperature 0.83 and stretched to (-0.1, 1.1), then clipped to [0, 1], so a gate is exactly 0
or 1 with some probability and differentiable in between; at evaluation the noise is left out.
`sigmoid` is the plain sigmoid of the logit. A logit of 3 (EcoDiff's `init_lambda`) opens a
hard concrete gate fully (1.0 exactly at evaluation), so masking starts from the dense model.
"""

from __future__ import annotations

import torch


MASKINGS = ("hard_discrete", "sigmoid")
TEMPERATURE = 0.83
STRETCH = (-0.1, 1.1)  # (gamma, eta): the gate's range before clipping


def gate_values(logits: torch.Tensor, masking: str, training: bool) -> torch.Tensor:
    """Gates of the same shape as `logits`, in [0, 1]; a training hard concrete gate draws its
    logistic noise from the global generator (a checkpointed recompute replays it)."""
    if masking == "sigmoid":
        return torch.sigmoid(logits)
    if masking != "hard_discrete":
        raise ValueError(f"masking={masking!r}; use one of {', '.join(MASKINGS)}")
    gamma, eta = STRETCH
    if training:
        u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
        soft = torch.sigmoid((torch.log(u) - torch.log1p(-u) + logits) / TEMPERATURE)
    else:
        soft = torch.sigmoid(logits)
    return (soft * (eta - gamma) + gamma).clamp(0.0, 1.0)


def closed_units(logits: torch.Tensor, masking: str) -> int:
    """Units whose evaluation gate falls below one half: those the binarised mask removes
    (a logit below 0 for either masking: the stretch is symmetric about one half)."""
    return int((gate_values(logits, masking, training=False) < 0.5).sum())
