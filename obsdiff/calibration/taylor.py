"""Diff-Pruning's importance (Fang et al., NeurIPS 2023): first-order Taylor scores |w ⊙ ∂L/∂w|
of the target linears' weights under the model's own training loss, accumulated over the
informative timesteps.

The official rule (`VainF/Diff-Pruning`, `ddpm_prune.py`) walks the training levels from the
low-noise end (t = 0, 1, ...), backpropagates the loss at each, and stops once the loss falls
below `threshold` times the largest loss seen (0.05 by default): the levels after that carry
little of what the model learnt. `taylor_scores` walks the levels the same way; the caller
gives the loss at a level (`loss_at`: the denoiser's training loss on clean latents noised
there, `obsdiff.models.training.noised_call`).

Memory: each target weight's gradient is turned into its score in a hook the moment it is
accumulated (`register_post_accumulate_grad_hook`) and freed at once, so the pass holds the
activations of one backward, one layer's gradient and the scores (one float32 per weight; a
structured prune may sum them per head or neuron as it goes). Non-target parameters take no
gradient. The clean latents of the loss are the dense model's own samples of the calibration
prompts, encoded by its VAE (`dense_samples`: data-free, as the recovery's inputs), noised with
one fixed noise at every level, as the official code noises its one batch.

This departs from the official code, which accumulates the gradients over the levels
and scores |w ⊙ Σ_t g_t| once: obsdiff scores each backward's gradient, Σ_t |w ⊙ g_t|, so that
no gradient outlives its layer (the two agree when one level is used; the official form would
hold a second copy of every target weight).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from obsdiff.models.base import ModelAdapter, prediction
from obsdiff.models.training import is_flow_matching, noised_call, text_call, training_schedule
from obsdiff.utils.nested import map_tensors
from obsdiff.utils.seeds import image_generators


if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


log = logging.getLogger(__name__)

OFFICIAL_THRESHOLD = 0.05  # Diff-Pruning's `thr`
OFFICIAL_LEVELS = 1000  # its timesteps, walked from t = 0


@dataclass
class TaylorScores:
    """Per-weight Taylor scores of the target linears (float32, each weight's shape) and the
    levels that fed them, low-noise end first, with their losses."""

    weights: dict[str, torch.Tensor]
    levels: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def group(self, name: str, rows: slice | None = None, columns: slice | None = None) -> float:
        """The score of a group of one linear's weights: the sum of its members' (a head's or
        a neuron's rows of a producer, columns of a consumer)."""
        block = self.weights[name]
        return float(block[rows or slice(None), columns or slice(None)].sum())


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
) -> TaylorScores:
    """Walk the levels 0, 1, ... (`loss_at(level)`: the training loss there, a scalar with a
    graph through `targets`, linears of `model`), backpropagate each, accumulate Σ |w ⊙ g| per
    weight of every target linear; stop after the first level whose loss is below `threshold`
    times the largest so far (it is scored too, as the official loop scores it), or after
    `levels`. Every other parameter of `model` is frozen meanwhile (no gradient, no memory),
    and every flag is put back."""
    check_threshold(threshold)
    if levels < 1:
        raise ValueError(f"method.levels={levels} must be >= 1")
    scores = {
        name: torch.zeros(linear.weight.shape, dtype=torch.float32, device=linear.weight.device)
        for name, linear in targets.items()
    }
    handles = []
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def scorer(name: str) -> Callable[[torch.Tensor], None]:
        def hook(weight: torch.Tensor) -> None:
            assert weight.grad is not None
            scores[name] += (weight.detach() * weight.grad).abs().float()
            weight.grad = None  # freed as soon as it is scored

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
    return TaylorScores(scores, used, losses)


def level_fraction(schedule: Any, level: int, levels: int) -> float:
    """The training level `level` of `levels`, counted from the low-noise end, as the fraction
    u in [0, 1) that `noised_call` takes: DDPM's t = u x 1000 grows with u (t = 0, 1, ... as
    the official loop), flow matching's sigma falls with it (its timesteps run from sigma 1)."""
    fraction = (level + 0.5) / levels
    return 1.0 - fraction if is_flow_matching(schedule) else level / levels


def dense_samples(
    adapter: ModelAdapter, pipe: DiffusionPipeline, prompts: list[str], seed: int
) -> tuple[tuple[tuple[Any, ...], dict[str, Any]], torch.Tensor]:
    """The prompts' conditioning as the pipeline passes it (`text_call`, guidance off) and the
    clean latents of the training loss: the dense pipeline's own images of the prompts (image i
    from seed + i) encoded by its VAE (`ModelAdapter.encode_latents`)."""
    if adapter.video:
        raise ValueError(
            f"Taylor scores of a video family ({adapter.family}) need its frames encoded as a "
            "video latent; not available yet: use another method for it"
        )
    generators = image_generators(seed, 0, len(prompts))
    with torch.no_grad():
        out = pipe(prompt=prompts, generator=generators, output_type="pt", **adapter.call_kwargs())
        images = out.images.to(pipe.vae.device, pipe.vae.dtype) * 2 - 1  # (B, 3, H, W) in [-1, 1]
        latents = adapter.encode_latents(pipe.vae, images)
    return text_call(adapter, pipe, prompts), latents


def training_loss(
    adapter: ModelAdapter,
    pipe: DiffusionPipeline,
    prompts: list[str],
    levels: int = OFFICIAL_LEVELS,
    seed: int = 0,
) -> Callable[[int], torch.Tensor]:
    """`loss_at(level)` for `taylor_scores`: the denoiser's own training loss (velocity MSE for
    flow matching, noise or velocity MSE otherwise) on `dense_samples` noised by one fixed
    noise at training level `level` of `levels` from the low-noise end, every prompt at once."""
    schedule = training_schedule(pipe)
    template, latents = dense_samples(adapter, pipe, prompts, seed)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    denoiser = adapter.denoiser(pipe)
    device = next(denoiser.parameters()).device

    def loss_at(level: int) -> torch.Tensor:
        u = torch.full((len(prompts),), level_fraction(schedule, level, levels))
        (args, kwargs), target = noised_call(adapter, schedule, template, latents, noise, u)
        args, kwargs = map_tensors((args, kwargs), lambda t: t.to(device))
        output = prediction(denoiser(*args, **kwargs)).float()
        truth = target.to(device).float()
        if output.shape[1] == 2 * truth.shape[1]:  # a learned variance (PixArt): the mean half
            output = output[:, : truth.shape[1]]
        return nn.functional.mse_loss(output, truth)

    return loss_at
