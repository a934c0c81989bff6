"""Data-free training inputs: the dense pipeline's own trajectories, recorded call by call.

Every call of the dense denoiser while it samples the prompts (its latents, timestep, prompt
embeddings, guidance, both classifier-free-guidance branches as the pipeline passes them) is
kept on the CPU, with its step. Training draws calls with the model's training density over
the steps' noise levels: logit-normal in sigma for the flow-matching families (as diffusers'
`compute_density_for_timestep_sampling` with `logit_normal`), uniform over the steps
otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from obsdiff.calibration.hooks import StepTracker
from obsdiff.calibration.sequential import embed_batches
from obsdiff.models.base import ModelAdapter
from obsdiff.models.training import is_flow_matching
from obsdiff.utils.nested import map_tensors
from obsdiff.utils.progress import progress
from obsdiff.utils.seeds import image_generators


@dataclass
class DenoiserCall:
    """One call of the denoiser: its positional and keyword arguments (on the CPU), its step
    (-1: not from a trajectory) and, for a call made from a clean image, the target of the
    model's own training loss."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    step: int
    target: torch.Tensor | None = None

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> DenoiserCall:
        return DenoiserCall(
            _moved(self.args, device, dtype),
            _moved(self.kwargs, device, dtype),
            self.step,
            None if self.target is None else self.target.to(device),
        )


def _moved(value: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """`value` with every tensor on `device` (floating ones in `dtype`, when given)."""

    def move(tensor: torch.Tensor) -> torch.Tensor:
        cast = dtype if dtype is not None and tensor.is_floating_point() else None
        return tensor.to(device=device, dtype=cast)

    return map_tensors(value, move)


def record_calls(
    pipe: Any,
    adapter: ModelAdapter,
    prompts: list[str],
    batch_size: int,
    seed: int,
    device: torch.device,
) -> list[DenoiserCall]:
    """Every denoiser call of the dense pipeline sampling `prompts` (image i from the noise of
    seed + i, `batch_size` prompts a call), on the CPU; a tensor passed unchanged at every step
    of a batch (its prompt embeddings) is kept once and shared by its calls."""
    denoiser: nn.Module = adapter.denoiser(pipe)
    tracker = StepTracker()
    calls: list[DenoiserCall] = []
    kept: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}  # this batch's copies

    def copied(tensor: torch.Tensor) -> torch.Tensor:
        """A CPU copy of `tensor`, made once for a tensor the pipeline passes at every step
        unchanged (the prompt embeddings: one copy a batch, not one a step); a tensor changed
        in place since (its version counter moved), or made in inference mode (it has none),
        is copied again."""
        if tensor.is_inference():  # no version counter to tell a change by: copied each time
            return tensor.to("cpu", copy=True)
        found = kept.get(id(tensor))
        if found is not None and found[0] is tensor and found[1] == tensor._version:
            return found[2]
        copy = tensor.to("cpu", copy=True)
        kept[id(tensor)] = (tensor, tensor._version, copy)  # holds it: its id stays its own
        return copy

    def keep(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append(
            DenoiserCall(map_tensors(args, copied), map_tensors(kwargs, copied), tracker.step)
        )

    embeddings = embed_batches(adapter, pipe, prompts, batch_size, device)
    handle = denoiser.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():  # not inference mode: the copies are the training's inputs
            for index, batch in enumerate(progress(embeddings, "teacher trajectories", "batch")):
                tracker.reset()
                kept.clear()
                first = index * batch_size
                count = len(prompts[first : first + batch_size])
                generators = image_generators(seed, first, count)
                adapter.calibration_call(pipe, batch, generators, tracker.on_step_end)
    finally:
        handle.remove()
    return calls


def step_density(pipe: Any, num_steps: int) -> torch.Tensor:
    """The probability of drawing each step (T,), float64: logit-normal (mean 0, std 1) density
    at the step's sigma for flow-matching schedulers, uniform otherwise."""
    sigmas = getattr(pipe.scheduler, "sigmas", None)
    flow = is_flow_matching(pipe.scheduler)
    if not flow or sigmas is None or len(sigmas) < num_steps:
        return torch.full((num_steps,), 1.0 / num_steps, dtype=torch.float64)
    sigma = torch.as_tensor(sigmas[:num_steps], dtype=torch.float64).clamp(1e-4, 1 - 1e-4)
    logit = torch.log(sigma / (1 - sigma))
    density = torch.exp(-0.5 * logit**2) / (math.sqrt(2 * math.pi) * sigma * (1 - sigma))
    return density / density.sum()


def draw_calls(
    calls: list[DenoiserCall], density: torch.Tensor, count: int, seed: int
) -> list[int]:
    """`count` call indices, each call drawn with its step's probability (shared among the
    step's calls), with replacement, seeded."""
    steps = torch.tensor([min(c.step, len(density) - 1) for c in calls])
    per_step = torch.bincount(steps, minlength=len(density)).clamp(min=1).to(torch.float64)
    weights = density[steps] / per_step[steps]
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(weights, count, replacement=True, generator=generator).tolist()
