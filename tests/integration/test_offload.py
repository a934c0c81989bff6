"""Offload: statistics in CPU memory and the pipeline's other components off the
device change where the work lives, never the pruned weights. On a CPU-only machine the
placement is checked with the meta device standing in for an accelerator; the CUDA round trip
is in tests/gpu/test_offload_cuda.py."""

from __future__ import annotations

import pytest
import torch

import obsdiff
from obsdiff.calibration.packages import list_units
from obsdiff.calibration.sequential import build_package, components_released
from obsdiff.methods import ObsDiff, Wanda
from obsdiff.models import SD3Adapter
from obsdiff.models.tiny import tiny_sd3_pipeline
from obsdiff.pruning.patterns import Unstructured
from obsdiff.pruning.statistics import InputStatistics


PROMPTS = ["a red circle", "a blue square", "two green triangles", "a yellow star"]
SAMPLING = {"num_inference_steps": 2, "height": 64, "width": 64, "max_sequence_length": 77}


def test_offloaded_statistics_live_on_the_cpu_beside_a_device_denoiser() -> None:
    adapter = SD3Adapter(name="tiny_sd3", tiny="sd3", dtype="float32")
    denoiser = tiny_sd3_pipeline().transformer.to("meta")  # the stand-in accelerator
    units = list_units(adapter, denoiser)
    for offload, where in ((False, "meta"), (True, "cpu")):
        package = build_package(
            denoiser, units, ObsDiff(), Unstructured(0.5), adapter=adapter, offload=offload
        )
        for group in package.groups:
            assert group.stats is not None
            assert {t.device.type for t in group.stats.state_tensors()} == {where}
        if offload:  # a work unit's statistics go to its linears' device for the solve
            moved = package.groups[0].local().stats
            assert moved is not None and moved.counts.device.type == "meta"
            assert package.groups[0].stats.counts.device.type == "cpu"  # type: ignore[union-attr]


def test_statistics_moved_to_a_device_keep_every_sum() -> None:
    stats = InputStatistics(8)
    stats.update(torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0)), 1.5)
    assert stats.to("cpu") is stats  # already there: no copy
    copy = stats.to("meta")
    assert copy is not stats and copy.named_state().keys() == stats.named_state().keys()
    assert all(t.device.type == "meta" for t in copy.state_tensors())
    assert (copy.features, copy.hessian, copy.moments) == (8, True, True)


def test_components_released_while_pruning_and_put_back() -> None:
    pipe = tiny_sd3_pipeline()
    pipe.transformer.to("meta")  # the stand-in accelerator
    with components_released(pipe, pipe.transformer, release=True):
        assert pipe.text_encoder.device.type == "cpu" and pipe.vae.device.type == "cpu"
        assert pipe.transformer.device.type == "meta"
    assert pipe.text_encoder.device.type == "meta" and pipe.vae.device.type == "meta"
    with components_released(pipe, pipe.transformer, release=False):
        assert pipe.text_encoder.device.type == "meta"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["obsdiff", "wanda"])
def test_offload_prunes_the_same_weights(method: str) -> None:
    weights = []
    for offload in (False, True):
        pipe = tiny_sd3_pipeline()
        obsdiff.prune(
            pipe, method, "unstructured", 0.5, prompts=PROMPTS, packages=2, sampling=SAMPLING,
            batch_size=2, device="cpu", offload_statistics=offload, offload_components=offload,
        )  # fmt: skip
        weights.append(pipe.transformer.state_dict())
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
    assert any(bool((t == 0).any()) for t in weights[1].values())


def test_the_plan_moves_offloaded_statistics_to_the_host() -> None:
    kept = obsdiff.memory_plan("sd3_medium", "obsdiff", packages=4)
    off = obsdiff.memory_plan("sd3_medium", "obsdiff", packages=4, offload_statistics=True)
    both = obsdiff.memory_plan(
        "sd3_medium", "obsdiff", packages=4, offload_statistics=True, offload_components=True
    )
    assert kept.host_statistics_bytes == 0 and kept.device_statistics_bytes > 0
    assert off.host_statistics_bytes == kept.statistics_peak_bytes
    assert off.device_statistics_bytes == 0
    # the device holds one work unit's statistics for its solve instead of the package's
    assert off.predicted_peak_bytes < kept.predicted_peak_bytes
    assert off.solve_bytes > kept.solve_bytes
    assert both.weights_bytes == both.components["transformer"] < off.weights_bytes
    assert "(CPU)" in both.table()
    wanda = obsdiff.memory_plan("sd3_medium", Wanda(), packages=4, offload_statistics=True)
    assert wanda.host_statistics_bytes > 0
