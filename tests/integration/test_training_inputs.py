"""The denoiser's training inputs (`obsdiff.models.training`): for every family, a clean latent
noised into the call its pipeline makes, and the target the prediction is compared with; for
the flow-matching families, the noisiest level reproduces the pipeline's own first call."""

from __future__ import annotations

import pytest
import torch
from registry import SHIPPED_MODELS, TINY_MODELS, one_denoiser

from obsdiff.api import model_from_config
from obsdiff.models.base import prediction
from obsdiff.models.training import is_flow_matching, noised_call, text_call, training_schedule


pytestmark = pytest.mark.integration

CAPTIONS = ["a red circle", "a blue square"]


@pytest.mark.parametrize(
    "model", [m for m in TINY_MODELS + SHIPPED_MODELS if one_denoiser(m)]
)  # what recovery trains on: one denoiser
def test_a_noised_latent_is_a_call_of_the_pipelines_layout(model: str) -> None:
    adapter = model_from_config(model)
    pipe = adapter.load()
    pipe.set_progress_bar_config(disable=True)
    template = text_call(adapter, pipe, CAPTIONS)
    schedule = training_schedule(pipe)
    shape = adapter.latent_shape(dict(pipe.components))  # (C, [F,] h, w)
    height, width = shape[-2:]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, *shape, generator=generator)
    noise = torch.randn(2, *shape, generator=generator)
    (args, kwargs), target = noised_call(
        adapter, schedule, template, latents, noise, torch.tensor([0.25, 0.75])
    )
    with torch.no_grad():
        output = prediction(adapter.denoiser(pipe)(*args, **kwargs))
    if output.shape[1] == 2 * target.shape[1]:  # PixArt's learned variance: the first half
        output = output[:, : target.shape[1]]
    assert output.shape == target.shape
    assert torch.isfinite(output).all()

    if is_flow_matching(
        pipe.scheduler
    ):  # u = 0: sigma 1, the pipeline's first call on its own noise
        first = template[1]["hidden_states"]
        if first.dim() == 3:  # Flux: unpack its tokens
            b, _, c4 = first.shape
            first = first.view(b, height // 2, width // 2, c4 // 4, 2, 2)
            first = first.permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, height, width)
        (_, again), _ = noised_call(adapter, schedule, template, latents, first, torch.zeros(2))
        assert torch.equal(again["hidden_states"], template[1]["hidden_states"])
        # Wan's UniPC passes integer timesteps, its first 999 where the schedule's is 1000
        timestep, first_timestep = again["timestep"], template[1]["timestep"]
        atol = 1 if timestep.dtype == torch.int64 else None
        torch.testing.assert_close(timestep, first_timestep, atol=atol, rtol=0 if atol else None)
