"""Diff-Pruning's importance (Fang et al., NeurIPS 2023): first-order Taylor scores |w ⊙ ∂L/∂w|
of the target linears' weights under the model's own training loss, accumulated over the
informative timesteps.

The official rule (`VainF/Diff-Pruning`, `ddpm_prune.py`) walks the training levels from the
low-noise end (t = 0, 1, ...), backpropagates the loss at each, and stops once the loss falls
below `threshold` times the largest loss seen (0.05 by default): the levels after that carry
little of what the model learnt. `taylor_scores` walks the levels the same way; the caller
gives the loss at a level (`loss_at`: `obsdiff.calibration.taylor.training_loss`, the
denoiser's training loss on clean latents noised there).

Memory: each target weight's gradient is turned into its score in a hook the moment it is
accumulated (`register_post_accumulate_grad_hook`) and freed at once, so the pass holds the
activations of one backward, one layer's gradient and its score, and the scores kept: one
float32 per weight for a pattern prune, one per row and column for a structured one (a head's or
neuron's score is a sum of rows and columns). Non-target parameters take no gradient.

This departs from the official code, which accumulates the gradients over the levels
and scores |w ⊙ Σ_t g_t| once: obsdiff scores each backward's gradient, Σ_t |w ⊙ g_t|, so that
no gradient outlives its layer (the two agree when one level is used; the official form would
hold a second copy of every target weight).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


log = logging.getLogger(__name__)

OFFICIAL_THRESHOLD = 0.05  # Diff-Pruning's `thr`
OFFICIAL_LEVELS = 1000  # its timesteps, walked from t = 0


@dataclass
class TaylorScores:
    """Taylor scores of the target linears (float32) and the levels that fed them, low-noise end
    first, with their losses: per weight (each weight's shape; kept when asked for: a pattern
    prune), and always summed per output row (`rows`, (out,)) and per input column (`columns`,
    (in,)), which is all a structured prune reads: a head's or neuron's score is the sum over
    its rows of the producers and its columns of the consumers."""

    weights: dict[str, torch.Tensor]
    rows: dict[str, torch.Tensor]
    columns: dict[str, torch.Tensor]
    levels: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def as_tensors(self) -> dict[str, torch.Tensor]:
        """Every score tensor by `<kind>:<linear name>` (kind: weights, rows, columns), to be
        kept in a safetensors file."""
        kinds = {"weights": self.weights, "rows": self.rows, "columns": self.columns}
        return {f"{kind}:{name}": t for kind, scores in kinds.items() for name, t in scores.items()}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], levels: list[int], losses: list[float]
    ) -> TaylorScores:
        """The scores `as_tensors` gave, with their levels and losses."""
        kinds: dict[str, dict[str, torch.Tensor]] = {"weights": {}, "rows": {}, "columns": {}}
        for key, tensor in tensors.items():
            kind, name = key.split(":", 1)
            kinds[kind][name] = tensor
        return cls(kinds["weights"], kinds["rows"], kinds["columns"], list(levels), list(losses))

    def group(self, name: str, rows: slice | None = None, columns: slice | None = None) -> float:
        """The score of a group of one linear's weights: whole rows (a head's or a neuron's
        rows of a producer) or whole columns (of a consumer)."""
        if (rows is None) == (columns is None):
            raise ValueError("give the group's rows or its columns")
        if rows is not None:
            return float(self.rows[name][rows].sum())
        return float(self.columns[name][columns].sum())


def check_threshold(threshold: float, key: str = "method.threshold") -> None:
    """ValueError naming `key` unless 0 < threshold <= 1."""
    if not 0 < threshold <= 1:
        raise ValueError(
            f"{key}={threshold} must lie in (0, 1]: the walk stops once a level's loss falls "
            f"below this share of the largest (Diff-Pruning's {OFFICIAL_THRESHOLD})"
        )


def taylor_scores(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    loss_at: Callable[[int], torch.Tensor],
    threshold: float = OFFICIAL_THRESHOLD,
    levels: int = OFFICIAL_LEVELS,
    per_weight: bool = True,
) -> TaylorScores:
    """Walk the levels 0, 1, ... (`loss_at(level)`: the training loss there, a scalar with a
    graph through `targets`, linears of `model`), backpropagate each, accumulate Σ |w ⊙ g| per
    weight of every target linear; stop after the first level whose loss is below `threshold`
    times the largest so far (it is scored too, as the official loop scores it), or after
    `levels`. Every other parameter of `model` is frozen meanwhile (no gradient, no memory),
    and every flag is put back. Without `per_weight` only the row and column sums are kept
    (a structured prune's: (out + in) floats a linear instead of out x in)."""
    check_threshold(threshold)
    if levels < 1:
        raise ValueError(f"method.levels={levels} must be >= 1")

    def zeros(*shape: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float32, device=device)

    weights, rows, columns = {}, {}, {}
    for name, linear in targets.items():
        out_features, in_features = linear.weight.shape
        device = linear.weight.device
        if per_weight:
            weights[name] = zeros(out_features, in_features, device=device)
        rows[name] = zeros(out_features, device=device)
        columns[name] = zeros(in_features, device=device)
    handles = []
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def scorer(name: str) -> Callable[[torch.Tensor], None]:
        def hook(weight: torch.Tensor) -> None:
            assert weight.grad is not None
            score = (weight.detach() * weight.grad).abs().float()  # (out, in)
            weight.grad = None  # freed as soon as it is scored
            rows[name] += score.sum(1)
            columns[name] += score.sum(0)
            if per_weight:
                weights[name] += score

        return hook

    for p, _ in flags:
        p.requires_grad_(False)
    for name, linear in targets.items():
        linear.weight.requires_grad_(True)
        handles.append(linear.weight.register_post_accumulate_grad_hook(scorer(name)))
    used: list[int] = []
    losses: list[float] = []
    try:
        largest = 0.0
        for level in range(levels):
            loss = loss_at(level)
            loss.backward()
            value = float(loss.detach())
            used.append(level)
            losses.append(value)
            largest = max(largest, value)
            if value < threshold * largest:
                break
    finally:
        for handle in handles:
            handle.remove()
        for linear in targets.values():
            linear.weight.grad = None
        for p, flag in flags:
            p.requires_grad_(flag)
    log.info(
        "Taylor scores over %d levels (%d..%d), loss %.4g -> %.4g (stops below %.3g x the "
        "largest)",
        len(used), used[0], used[-1], losses[0], losses[-1], threshold,
    )  # fmt: skip
    return TaylorScores(weights, rows, columns, used, losses)
