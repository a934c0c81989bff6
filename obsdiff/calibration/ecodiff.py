"""EcoDiff's mask training on a pipeline (Zhang et al., "Learnable Sparsity for Vision Generative
Models", ICLR 2026): one learnable gate per attention head and FFN neuron, trained end to end
through the whole sampler so that the masked model's final latent matches the dense model's for
the same prompt and seed, with an L1 pull on the gates.

- The gates act by hooks (`mask_hooks`): each multiplies its units' input columns of the
  consumers (output and down projections, the columns obsdiff's surgery would cut) by the
  unit's gate. A gate of exactly 1 leaves the model as it is, bit for bit.
- Backpropagation through the sampler: the pipeline's own call with autograd on (diffusers
  wraps it in `torch.no_grad`), each denoiser call checkpointed (`torch.utils.checkpoint`,
  non-reentrant; the logistic noise of the gates is replayed), so only the latents of each step
  and one step's activations are held (EcoDiff's timestep gradient checkpointing).
- The loop is on Lightning Fabric (precision, device), as the recovery's; the dense targets are
  computed first, from the same prompts and seeds.
- The L1 weight beta sets how many gates close. EcoDiff tunes it by a sweep
  (`hyperparameter_tuning.py`); here it is bisected (`train_masks_for`): trainings from the
  same start until the binarised mask closes as many units as the sparsity asks (geometric
  steps, at most `bisection_steps` trainings). The units removed are then each group's
  lowest-logit ones (EcoDiff's `local` binarisation), so the count is exact whatever the last
  training closed.

Departures from the official code, each for obsdiff's setting: the pull is the mean of the
evaluation gates (the official code regularises its lambdas with shifted bounds); a training
gate's noise is drawn once a trajectory (the official hooks draw it at every denoiser call),
so that the recomputed calls of the backward see the gates of the forward; the optimiser is
AdamW without weight decay under the official constant learning rates and warm-up; the
norm-channel masks FLUX also gets there are not trained (obsdiff's structured granularity is
heads and neurons); a data-parallel run trains the same gates on every rank.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from obsdiff.methods.ecodiff import EcoDiff
from obsdiff.methods.package import UnitGroup
from obsdiff.models.base import ModelAdapter
from obsdiff.models.experts import called_modules
from obsdiff.models.structure import linear_at
from obsdiff.pruning.gates import closed_units, gate_values
from obsdiff.utils.seeds import image_generators


if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


log = logging.getLogger(__name__)


@dataclass
class MaskResult:
    """The kept training's logits by group key (units,) and its beta and losses (one per
    optimizer step), and every training's (beta, units its binarised mask closed)."""

    logits: dict[str, torch.Tensor]
    beta: float
    losses: list[float]
    trainings: list[tuple[float, int]] = field(default_factory=list)


class UnitGates(nn.Module):
    """One logit per unit of every group (a ParameterList in the groups' order)."""

    def __init__(self, groups: list[UnitGroup], init_logit: float, device: torch.device) -> None:
        super().__init__()
        self.keys = [g.key for g in groups]
        self.kinds = [g.kind for g in groups]
        self.logits = nn.ParameterList(
            nn.Parameter(torch.full((g.units,), init_logit, device=device)) for g in groups
        )

    def by_key(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in zip(self.keys, self.logits, strict=True)}


@contextmanager
def mask_hooks(
    denoiser: nn.Module, groups: list[UnitGroup], gates: Callable[[int], torch.Tensor]
) -> Iterator[None]:
    """Within the block, every consumer's input columns of group i's units are multiplied by
    `gates(i)` (units,), each gate repeated over its unit's width; other columns by 1."""
    segments: dict[str, list[tuple[int, int, int]]] = {}  # consumer -> (offset, group, width)
    for index, group in enumerate(groups):
        for name, offset in group.consumers:
            segments.setdefault(name, []).append((offset, index, group.unit_width))

    def hook_for(name: str, in_features: int) -> Callable[..., Any]:
        parts = sorted(segments[name])

        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]  # (..., in_features)
            pieces, at = [], 0
            for offset, index, unit_width in parts:
                gate = gates(index).repeat_interleave(unit_width)  # (units x width,)
                if offset > at:
                    pieces.append(torch.ones(offset - at, device=gate.device, dtype=gate.dtype))
                pieces.append(gate)
                at = offset + gate.numel()
            if at < in_features:
                pieces.append(torch.ones(in_features - at, device=x.device, dtype=pieces[0].dtype))
            scale = torch.cat(pieces).to(x.dtype)  # (in_features,)
            return (x * scale, *args[1:])

        return hook

    handles = []
    try:
        for name in segments:
            linear = linear_at(denoiser, name)
            handles.append(linear.register_forward_pre_hook(hook_for(name, linear.in_features)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def checkpointed_steps(denoiser: nn.Module) -> Iterator[None]:
    """Every denoiser call (each expert's) recomputed in the backward instead of kept: the
    sampler's graph holds the calls' inputs and outputs only."""
    patched = []
    try:
        for module in called_modules(denoiser):
            forward = module.forward

            def run(*args: Any, _forward: Callable[..., Any] = forward, **kwargs: Any) -> Any:
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

            module.forward = run  # type: ignore[method-assign]
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward  # the class's forward again


def final_latents(
    adapter: ModelAdapter,
    pipe: DiffusionPipeline,
    embeddings: dict[str, torch.Tensor],
    generators: list[torch.Generator],
) -> torch.Tensor:
    """The trajectory's final latents with autograd on (the pipeline's call without its
    `torch.no_grad`), as the pipeline returns them with `output_type="latent"`."""
    call = getattr(type(pipe).__call__, "__wrapped__", type(pipe).__call__)
    out = call(pipe, **embeddings, **adapter.calibration_kwargs(), generator=generators,
               output_type="latent")  # fmt: skip
    return adapter.outputs(out)


def train_masks(
    adapter: ModelAdapter,
    pipe: DiffusionPipeline,
    groups: list[UnitGroup],
    embeddings: list[dict[str, torch.Tensor]],
    settings: EcoDiff,
    beta: float,
    calibration_seed: int = 0,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """One training of the gates at `beta`: the logits by group key and each optimizer step's
    loss. Prompt batch b's image i uses the calibration seed of its place in the prompt list,
    for the dense target and the masked trajectory alike."""
    denoiser = adapter.denoiser(pipe)
    device = next(denoiser.parameters()).device
    batches = [{k: v.clone() for k, v in batch.items()} for batch in embeddings]  # not inference
    spans, start = [], 0  # each batch's (first prompt, prompts): its images' seeds
    for batch in batches:
        count = next(iter(batch.values())).shape[0]
        spans.append((start, count))
        start += count

    def seeds(b: int) -> list[torch.Generator]:
        return image_generators(calibration_seed, *spans[b])

    with torch.no_grad():
        targets = [final_latents(adapter, pipe, batch, seeds(b)) for b, batch in enumerate(batches)]
    fabric = L.Fabric(
        accelerator="cuda" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        precision="32-true",
    )
    torch.manual_seed(settings.seed)  # the gates' logistic noise
    gates = UnitGates(groups, settings.init_logit, device)
    lr = {"heads": settings.lr_heads, "neurons": settings.lr_neurons}
    optimizer = torch.optim.AdamW(
        [
            {"params": [p], "lr": lr[kind]}
            for p, kind in zip(gates.logits, gates.kinds, strict=True)
        ],
        weight_decay=0.0,
    )

    def warmup(step: int) -> float:
        return min(1.0, (step + 1) / settings.warmup_steps) if settings.warmup_steps else 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
    gates, optimizer = fabric.setup(gates, optimizer)
    flags = [(p, p.requires_grad) for p in denoiser.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    values: list[torch.Tensor] = []

    def gate(index: int) -> torch.Tensor:
        return values[index]

    losses: list[float] = []
    order = torch.Generator().manual_seed(settings.seed)
    total, micro = 0.0, 0
    try:
        with mask_hooks(denoiser, groups, gate), checkpointed_steps(denoiser):
            for _ in range(settings.epochs):
                for b in torch.randperm(len(batches), generator=order).tolist():
                    values[:] = [gate_values(p, settings.masking, True) for p in gates.logits]
                    latents = final_latents(adapter, pipe, batches[b], seeds(b))
                    evaluation = torch.cat(
                        [gate_values(p, settings.masking, False) for p in gates.logits]
                    )
                    loss = nn.functional.mse_loss(latents.float(), targets[b].float())
                    loss = loss + beta * evaluation.mean()
                    fabric.backward(loss / settings.accumulate)
                    total += float(loss.detach()) / settings.accumulate
                    micro += 1
                    if micro == settings.accumulate:
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        scheduler.step()
                        losses.append(total)
                        total, micro = 0.0, 0
            if micro:  # the last, partial accumulation
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(total * settings.accumulate / micro)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    if not all(math.isfinite(v) for v in losses):
        raise FloatingPointError(
            f"EcoDiff's mask training diverged at beta={beta}; lower method.lr_heads and "
            "method.lr_neurons"
        )
    return gates.by_key(), losses  # type: ignore[operator]


def train_masks_for(
    adapter: ModelAdapter,
    pipe: DiffusionPipeline,
    groups: list[UnitGroup],
    counts: list[int],
    embeddings: list[dict[str, torch.Tensor]],
    settings: EcoDiff,
    calibration_seed: int = 0,
) -> MaskResult:
    """Train the gates, bisecting beta (geometrically, from `settings.beta`: x4 or /4 until the
    target is bracketed, then the geometric mean; at most `settings.bisection_steps` trainings,
    1: once at `settings.beta`) until the binarised mask closes sum(`counts`) units, those the
    structured prune removes (group i loses counts[i]); the training that came closest is
    kept."""
    wanted = sum(counts)
    trainings: list[tuple[float, int]] = []
    best: MaskResult | None = None
    low, high, beta = 0.0, math.inf, settings.beta
    for attempt in range(settings.bisection_steps):
        logits, losses = train_masks(
            adapter, pipe, groups, embeddings, settings, beta, calibration_seed
        )
        closed = sum(closed_units(v, settings.masking) for v in logits.values())
        trainings.append((beta, closed))
        log.info(
            "EcoDiff training %d: beta %.4g closes %d units (wanted %d), loss %.4g",
            attempt + 1, beta, closed, wanted, losses[-1] if losses else float("nan"),
        )  # fmt: skip
        if best is None or abs(closed - wanted) < abs(best.trainings[-1][1] - wanted):
            best = MaskResult(logits, beta, losses, [(beta, closed)])
        if closed == wanted:
            break
        if closed < wanted:  # too weak a pull
            low = beta
            beta = beta * 4 if math.isinf(high) else math.sqrt(beta * high)
        else:
            high = beta
            beta = beta / 4 if low == 0.0 else math.sqrt(low * beta)
    assert best is not None
    best.trainings = trainings
    return best
