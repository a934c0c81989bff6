"""Statistics fed by hooks during real pipeline calls equal the closed form of Eq. 5, on every
tiny model (so every adapter class, each CFG mode, PNDM's extra step)."""

from __future__ import annotations

import pytest
import torch
from registry import TINY_BY_ADAPTER, TINY_MODELS, tiny_adapter

from obsdiff.calibration.hooks import StatisticsHooks, StepTracker, count_hooks
from obsdiff.models import ADAPTERS, ModelAdapter
from obsdiff.models.experts import expert_of
from obsdiff.models.sampling import CFG_DOUBLED_BATCH, CFG_SEPARATE_CALLS
from obsdiff.pruning import InputStatistics, log_decrease
from obsdiff.utils.seeds import image_generators


pytestmark = pytest.mark.integration

SAMPLING = {"num_inference_steps": 3, "height": 64, "width": 64}


def first_linear(adapter: ModelAdapter, denoiser: torch.nn.Module) -> torch.nn.Linear:
    name, block = adapter.blocks(denoiser)[1]
    return block.get_submodule(adapter.block_units(block)[0][0][0])


def test_every_adapter_class_has_a_tiny_model() -> None:
    assert set(TINY_BY_ADAPTER) == set(ADAPTERS) and all(TINY_BY_ADAPTER.values())


@pytest.mark.parametrize("model", TINY_MODELS)
@pytest.mark.parametrize("include_uncond", [True, False])
def test_hooked_statistics_equal_the_closed_form(model: str, include_uncond: bool) -> None:
    adapter = tiny_adapter(model, sampling=SAMPLING)
    pipe = adapter.load()
    pipe.set_progress_bar_config(disable=True)
    denoiser = adapter.denoiser(pipe)
    layer = first_linear(adapter, denoiser)
    steps = adapter.denoising_steps(pipe)  # PNDM (SD 1.5, 2.1): one step more than asked
    # the steps whose calls reach the layer: every step, or its timestep expert's own
    own = adapter.expert_steps(pipe)[expert_of(adapter.blocks(denoiser)[1][0], denoiser)]
    weights = log_decrease(steps)
    tracker = StepTracker()
    cfg_mode = adapter.cfg_mode()

    # reference: record every input of the layer with its step and call number
    seen: list[tuple[int, int, torch.Tensor]] = []

    def record(module, args):  # type: ignore[no-untyped-def]
        seen.append((tracker.step, tracker.call_in_step, args[0].detach().clone()))

    stats = InputStatistics(layer.in_features, moments=False)
    hooks = StatisticsHooks(denoiser, [(layer, stats)], weights, tracker, cfg_mode, include_uncond)
    prompts = ["a red circle", "a green square"]
    embeddings = adapter.encode_prompts(pipe, prompts, torch.device("cpu"))
    handle = layer.register_forward_pre_hook(record)
    with hooks.attached(), torch.inference_mode():
        tracker.reset()
        adapter.calibration_call(pipe, embeddings, image_generators(0, 0, 2), tracker.on_step_end)
    assert count_hooks(denoiser) == 1  # only the test's own recorder is left
    handle.remove()

    xtx = torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64)
    denominator = 0.0
    calls_per_step = 2 if cfg_mode == CFG_SEPARATE_CALLS else 1
    assert len(seen) == len(own) * calls_per_step
    assert [step for step, _, _ in seen] == [s for s in own for _ in range(calls_per_step)]
    for step, call, x in seen:
        if not include_uncond:
            if cfg_mode == CFG_DOUBLED_BATCH:
                x = x[x.shape[0] // 2 :]
            elif call > 1:
                continue
        rows = x.reshape(-1, layer.in_features).double()
        xtx += float(weights[step]) * rows.T @ rows
        denominator += float(weights[step]) * x.shape[0]
    expected = 2 * xtx / denominator
    torch.testing.assert_close(stats.hessian_matrix().double(), expected, rtol=1e-4, atol=1e-4)
    batch = 4 if cfg_mode == CFG_DOUBLED_BATCH else 2
    expected_samples = len(own) * calls_per_step * batch if include_uncond else len(own) * 2
    assert stats.num_samples == expected_samples
