"""Statistics fed by hooks during real pipeline calls equal the closed form of Eq. 5."""

from __future__ import annotations

import pytest
import torch

from obsdiff.calibration.hooks import StatisticsHooks, StepTracker, count_hooks
from obsdiff.models import FluxAdapter, ModelAdapter, SD3Adapter, SDXLAdapter
from obsdiff.pruning import InputStatistics, log_decrease
from obsdiff.utils.seeds import image_generators


pytestmark = pytest.mark.integration

SAMPLING = {"num_inference_steps": 3, "height": 64, "width": 64, "guidance_scale": 4.0}
ADAPTERS = {
    "sd3": lambda: SD3Adapter(
        name="s", tiny="sd3", sampling={**SAMPLING, "max_sequence_length": 77}
    ),
    "sdxl": lambda: SDXLAdapter(name="x", tiny="sdxl", sampling=SAMPLING),
    "flux": lambda: FluxAdapter(
        name="f",
        tiny="dev",
        sampling={
            **SAMPLING,
            "true_cfg_scale": 3.0,
            "negative_prompt": "",
            "max_sequence_length": 77,
        },
    ),
}


def first_linear(adapter: ModelAdapter, denoiser: torch.nn.Module) -> torch.nn.Linear:
    name, block = adapter.blocks(denoiser)[1]
    return block.get_submodule(adapter.block_units(block)[0][0][0])


@pytest.mark.parametrize("family", sorted(ADAPTERS))
@pytest.mark.parametrize("include_uncond", [True, False])
def test_hooked_statistics_equal_the_closed_form(family: str, include_uncond: bool) -> None:
    adapter = ADAPTERS[family]()
    pipe = adapter.load()
    pipe.set_progress_bar_config(disable=True)
    denoiser = adapter.denoiser(pipe)
    layer = first_linear(adapter, denoiser)
    weights = log_decrease(3)
    tracker = StepTracker()

    # reference: record every input of the layer with its step and call number
    seen: list[tuple[int, int, torch.Tensor]] = []

    def record(module, args):  # type: ignore[no-untyped-def]
        seen.append((tracker.step, tracker.call_in_step, args[0].detach().clone()))

    stats = InputStatistics(layer.in_features, moments=False)
    hooks = StatisticsHooks(
        denoiser, [(layer, stats)], weights, tracker, adapter.cfg_mode(), include_uncond
    )
    embeddings = adapter.encode_prompts(
        pipe, ["a red circle", "a green square"], torch.device("cpu")
    )
    handle = layer.register_forward_pre_hook(record)
    with hooks.attached(), torch.inference_mode():
        tracker.reset()
        adapter.calibration_call(pipe, embeddings, image_generators(0, 0, 2), tracker.on_step_end)
    assert count_hooks(denoiser) == 1  # only the test's own recorder is left
    handle.remove()

    xtx = torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64)
    denominator = 0.0
    calls_per_step = 2 if adapter.cfg_mode() == "separate_calls" else 1
    assert len(seen) == 3 * calls_per_step
    for step, call, x in seen:
        if not include_uncond:
            if adapter.cfg_mode() == "doubled_batch":
                x = x[x.shape[0] // 2 :]
            elif call > 1:
                continue
        rows = x.reshape(-1, layer.in_features).double()
        xtx += float(weights[step]) * rows.T @ rows
        denominator += float(weights[step]) * x.shape[0]
    expected = 2 * xtx / denominator
    torch.testing.assert_close(stats.hessian_matrix().double(), expected, rtol=1e-4, atol=1e-4)
    batch = 4 if adapter.cfg_mode() == "doubled_batch" else 2
    expected_samples = 3 * calls_per_step * batch if include_uncond else 3 * 2
    assert stats.num_samples == expected_samples
