"""The recovery's memory plan: the example denoiser calls it measures are what each pipeline
passes, and on a tiny model every term is what a recovery step allocates; the real models'
plans from their shipped configs."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from registry import REAL_MODELS, SHIPPED_MODELS, TINY_MODELS, one_denoiser

import obsdiff
from obsdiff.api import model_from_config
from obsdiff.recovery.data import record_calls
from obsdiff.recovery.plan import DEVICE_SIZES_GB, recovery_plan, saved_activations
from obsdiff.recovery.settings import RecoverySettings
from obsdiff.utils.nested import tensors_in


pytestmark = pytest.mark.integration

CPU = torch.device("cpu")


def layout(value: Any) -> Any:
    """Every tensor as its shape (and dtype where it is a floating tensor of 2 dims or more)."""
    if isinstance(value, torch.Tensor):
        floating = value.is_floating_point() and value.dim() >= 2
        return (tuple(value.shape), value.dtype if floating else None)
    if isinstance(value, dict):
        return {k: layout(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [layout(v) for v in value]
    return value


@pytest.mark.parametrize("model", [m for m in TINY_MODELS + SHIPPED_MODELS if one_denoiser(m)])
def test_example_calls_are_what_the_pipelines_pass(model: str) -> None:
    adapter = model_from_config(model)
    pipe = adapter.load()
    pipe.set_progress_bar_config(disable=True)
    recorded = record_calls(pipe, adapter, ["a red circle", "a blue square"], 2, 0, CPU)[0]
    args, kwargs = adapter.example_call(2, adapter.component_skeletons())
    assert all(t.is_meta for t in tensors_in((args, kwargs)))
    assert layout((args, kwargs)) == layout((recorded.args, recorded.kwargs))


def test_the_plan_is_what_a_tiny_model_allocates() -> None:
    """Weights, gradients and AdamW's moments of a float32 student, the teacher's features and
    every activation autograd keeps (on the CPU, its own attention kernel), byte for byte; in
    bf16 autocast the activations within 5%."""
    adapter = model_from_config("tiny_sd3")
    pipe = adapter.load()
    pipe.set_progress_bar_config(disable=True)
    plan = recovery_plan(adapter, RecoverySettings(), prompts=2)
    call = record_calls(pipe, adapter, ["a red circle", "a blue square"], 2, 0, CPU)[0]
    student = copy.deepcopy(adapter.denoiser(pipe)).float()
    blocks = [b for _, b in adapter.blocks(student)]

    def forward() -> torch.Tensor:
        return student(*call.args, **call.kwargs)[0]

    saved = saved_activations(student, blocks, forward, fused=False)
    assert plan.activation_bytes == saved.total
    assert plan.block_activation_bytes == saved.per_block
    assert plan.feature_bytes == sum(saved.block_outputs)
    assert plan.checkpointed_activation_bytes < plan.activation_bytes

    optimizer = torch.optim.AdamW(student.parameters())
    forward().square().mean().backward()
    optimizer.step()
    parameters = list(student.parameters())
    assert plan.student_bytes == sum(p.nbytes for p in parameters)
    assert plan.gradient_bytes == sum(p.grad.nbytes for p in parameters if p.grad is not None)
    moments = [s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert plan.optimizer_bytes == sum(m.nbytes for m in moments)
    components = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    assert plan.recording_bytes == sum(
        t.nbytes for c in components for t in [*c.parameters(), *c.buffers()]
    )

    mixed = recovery_plan(adapter, RecoverySettings(precision="bf16-mixed"), prompts=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = saved_activations(student, blocks, forward, fused=False).total
    assert abs(mixed.activation_bytes - autocast) < 0.05 * autocast


@pytest.mark.parametrize("model", [m for m in REAL_MODELS if one_denoiser(m)])
def test_real_models_have_a_plan(model: str) -> None:
    plan = obsdiff.recovery_memory_plan(model, batch_size=1, precision="bf16-mixed")
    assert plan.activation_bytes > plan.checkpointed_activation_bytes > 0
    assert plan.student_bytes == 4 * plan.parameters == plan.optimizer_bytes // 2
    for checkpointing in (False, True):
        fewest = [plan.fewest_devices(size, checkpointing) for size in DEVICE_SIZES_GB]
        found = [n for n in fewest if n is not None]
        assert found == sorted(found, reverse=True)
    # with checkpointing every model fits the largest devices but where its activations, which
    # do not shard, take most of one (Wan's 81 frames at 720 x 1280: 68 GB)
    if fewest[-1] is None:
        assert plan.activations(True) > 0.5 * DEVICE_SIZES_GB[-1] * 1e9, model
    assert f"recovery memory plan: {model}" in plan.table()


def test_sd3_medium_recovery_holds_what_its_sizes_say() -> None:
    """2,028,328,000 parameters: a float16 teacher (2 bytes each), a float32 student, its
    gradients and two AdamW moments (16 bytes each); 1024 x 1024 with CFG: 2 samples a call."""
    plan = obsdiff.recovery_memory_plan("sd3_medium", batch_size=1)
    assert plan.parameters == 2_028_328_000 and plan.samples_per_call == 2
    assert plan.teacher_bytes == 2 * plan.parameters
    assert plan.states_bytes == 18 * plan.parameters


@pytest.mark.parametrize("model", [m for m in REAL_MODELS + TINY_MODELS if not one_denoiser(m)])
def test_timestep_experts_are_not_recovered(model: str) -> None:
    """Recovery trains one denoiser: a pipeline of timestep experts (Wan 2.2-A14B) is refused,
    naming them and the fix, from its architecture alone."""
    with pytest.raises(ValueError, match=r"transformer, transformer_2.*recover=none"):
        obsdiff.recovery_memory_plan(model, batch_size=1)
