"""The denoiser's training inputs: a clean latent noised at a training noise level, in the call
layout its pipeline uses, and the target of the model's own training loss.

    template = text_call(adapter, pipe, captions)     # the pipeline's own call, CFG off
    call, target = noised_call(adapter, training_schedule(pipe), template, latents, noise, u)

The text side of a call (embeddings, pooled embeddings, masks, Flux's ids and guidance, SDXL's
size ids) is taken from the pipeline itself: `text_call` captures the first denoiser call of a
two-step sampling of the captions, classifier-free guidance off, so every family's conditioning
is exactly what its pipeline passes. `noised_call` then puts the noised latent and its timestep
where the family's call carries them (`ModelAdapter.with_latents`), as diffusers' training
scripts noise them:
- flow matching (SD3, Flux; a `FlowMatch*` scheduler): the training schedule of
  `FlowMatchEulerDiscreteScheduler.from_config` (its 1000 timesteps and sigmas, SD3's shift
  included), the level at `u` in [0, 1) (logit-normal u: diffusers'
  `compute_density_for_timestep_sampling`), x_t = (1 - sigma) x0 + sigma noise, target
  noise - x0 (the velocity);
- the others: `DDPMScheduler.from_config` (the pipeline's own sampler is Euler or PNDM, whose
  `add_noise` is not the training one), t = floor(u * 1000), x_t by its `add_noise`, target the
  noise (or the velocity for `v_prediction` models).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from obsdiff.models.base import ModelAdapter
from obsdiff.models.experts import called_modules
from obsdiff.models.sampling import CFG_DOUBLED_BATCH
from obsdiff.utils.nested import map_tensors


if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


class _Captured(Exception):
    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__("captured")
        self.args, self.kwargs = args, kwargs


def text_call(
    adapter: ModelAdapter, pipe: DiffusionPipeline, captions: list[str]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The first denoiser call of `pipe` sampling `captions` with classifier-free guidance off
    (one sample a caption), on the CPU: the conditioning as the pipeline passes it. Its latent
    and timestep are the sampler's, for `noised_call` to replace."""
    called = called_modules(adapter.denoiser(pipe))  # timestep experts: whichever comes first

    def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise _Captured(map_tensors(args, _on_cpu), map_tensors(kwargs, _on_cpu))

    kwargs = adapter.call_kwargs()
    for key in ("negative_prompt", "true_cfg_scale"):
        kwargs.pop(key, None)
    if adapter.cfg_mode() == CFG_DOUBLED_BATCH:  # guidance 1: a conditional batch only
        kwargs["guidance_scale"] = 1.0  # (Flux's guidance is embedded; its true CFG dropped)
    kwargs["num_inference_steps"] = 2  # the first call is taken (one step: Qwen-Image's sigmas NaN)
    handles = [m.register_forward_pre_hook(capture, with_kwargs=True) for m in called]
    try:
        with torch.no_grad():
            pipe(prompt=captions, output_type="latent", **kwargs)
    except _Captured as captured:
        return captured.args, captured.kwargs
    finally:
        for handle in handles:
            handle.remove()
    raise RuntimeError(f"{type(pipe).__name__} never called its denoiser")


def _on_cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


def is_flow_matching(scheduler: Any) -> bool:
    """Whether a diffusers scheduler samples a flow-matching model: one of the FlowMatch
    schedulers, or another on flow sigmas (Wan's UniPC, `prediction_type="flow_prediction"`)."""
    config = getattr(scheduler, "config", {})
    flow = config.get("prediction_type") == "flow_prediction" or config.get("use_flow_sigmas")
    return type(scheduler).__name__.startswith("FlowMatch") or bool(flow)


def training_schedule(pipe: DiffusionPipeline) -> Any:
    """The training scheduler of `pipe`'s model, from its scheduler's config: flow matching's
    `FlowMatchEulerDiscreteScheduler` (1000 levels, SD3's shift included), else `DDPMScheduler`
    (the pipeline's own sampler, Euler or PNDM, noises otherwise); built once, used by every
    `noised_call`."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    config = pipe.scheduler.config
    if not is_flow_matching(pipe.scheduler):
        return DDPMScheduler.from_config(config)
    if "flow_shift" in config:  # a sampler on flow sigmas (Wan's UniPC) names its shift so
        return FlowMatchEulerDiscreteScheduler(shift=config["flow_shift"])
    return FlowMatchEulerDiscreteScheduler.from_config(config)


def _flow_index(schedule: Any, u: torch.Tensor) -> torch.Tensor:
    return (u * len(schedule.timesteps)).long().clamp(0, len(schedule.timesteps) - 1)


def training_timestep(schedule: Any, u: torch.Tensor) -> torch.Tensor:
    """The timesteps (B,) in [0, 1000] of training levels `u` (B,) in [0, 1) of `schedule`."""
    if is_flow_matching(schedule):
        return schedule.timesteps[_flow_index(schedule, u)]  # type: ignore[no-any-return]
    steps = schedule.config.num_train_timesteps
    return (u * steps).long().clamp(0, steps - 1)


def noised_call(
    adapter: ModelAdapter,
    schedule: Any,
    template: tuple[tuple[Any, ...], dict[str, Any]],
    latents: torch.Tensor,
    noise: torch.Tensor,
    u: torch.Tensor,
) -> tuple[tuple[tuple[Any, ...], dict[str, Any]], torch.Tensor]:
    """`template` (a `text_call` of the same batch) with `latents` (B, C, h, w, or a video's
    B, C, F, h, w: the VAE's normalised latents) noised by `noise` at the training levels `u`
    (B,) in [0, 1) of `schedule` (`training_schedule`); and the target of the model's training
    loss, in the layout of the denoiser's prediction."""
    timestep = training_timestep(schedule, u)
    if is_flow_matching(schedule):
        index = _flow_index(schedule, u)
        sigma = schedule.sigmas[index].to(latents.dtype)
        sigma = sigma.view(-1, *[1] * (latents.dim() - 1))  # over (C, [F,] h, w)
        noised = (1 - sigma) * latents + sigma * noise
        target = noise - latents
    else:
        noised = schedule.add_noise(latents, noise, timestep)
        velocity = schedule.config.prediction_type == "v_prediction"
        target = schedule.get_velocity(latents, noise, timestep) if velocity else noise
    return adapter.with_latents(template, noised, timestep), adapter.as_prediction(target)
