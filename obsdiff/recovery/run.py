"""A pruned model recovered: its denoiser distilled towards the dense one on the dense model's
own trajectories (data-free), by the Lightning Trainer."""

from __future__ import annotations

import copy
import logging
import sys
import time
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from obsdiff.artifacts.pruned import PrunedModel
from obsdiff.artifacts.record import RecoveryResult
from obsdiff.recovery.data import draw_calls, record_calls, step_density
from obsdiff.recovery.module import Distillation
from obsdiff.recovery.settings import RecoverySettings
from obsdiff.utils.memory import peak_memory_bytes, reset_peak_memory


log = logging.getLogger(__name__)

SPARSE_GRANULARITIES = ("unstructured", "nm")  # kinds whose zeros a recovery must keep


def kept_weights(pruned: PrunedModel) -> dict[str, torch.Tensor]:
    """The masks of an unstructured or N:M prune: for each pruned linear's weight (the
    manifest's layer records), True where a weight was kept. A structured prune has none."""
    granularity = str(pruned.manifest.get("granularity", ""))
    if not granularity.startswith(("unstructured", "semi_")):
        return {}
    parameters = dict(pruned.denoiser.named_parameters())
    names = [
        f"{r['name']}.weight"
        for r in pruned.manifest.get("records", [])
        if r.get("type", "layer") == "layer"
    ]
    return {name: parameters[name].detach() != 0 for name in names if name in parameters}


def recover_pruned(
    pruned: PrunedModel,
    teacher: Any,
    prompts: list[str],
    settings: RecoverySettings,
    device: torch.device,
    batch_size: int = 1,
) -> PrunedModel:
    """`pruned` with its denoiser distilled towards `teacher` (the dense pipeline of the same
    base model), on the teacher's trajectories for `prompts`; the pruned model itself is left
    as it was. Returns the recovered model: its manifest with a `recovery` section (the
    settings), `recovery` what it did."""
    started = time.perf_counter()
    reset_peak_memory(device)
    adapter = pruned.adapter
    teacher = teacher.to(device)
    teacher.set_progress_bar_config(disable=True)
    calls = record_calls(teacher, adapter, prompts, batch_size, settings.seed, device)
    density = step_density(teacher, adapter.denoising_steps(teacher))
    order = draw_calls(calls, density, settings.steps * settings.accumulate, settings.seed)
    log.info(
        "recovery: %d teacher calls recorded from %d prompts; %d steps", len(calls), len(prompts),
        settings.steps,
    )  # fmt: skip
    components = dict(pruned.pipeline.components)  # shared: only the denoiser trains
    components[adapter.denoiser_attr] = copy.deepcopy(pruned.denoiser)
    recovered = type(pruned.pipeline)(**components)
    student: nn.Module = adapter.denoiser(recovered).to(device).train()
    teacher_denoiser: nn.Module = adapter.denoiser(teacher)
    masks = kept_weights(PrunedModel(recovered, adapter, pruned.manifest))
    module = Distillation(
        student,
        teacher_denoiser,
        [b for _, b in adapter.blocks(student)],
        [b for _, b in adapter.blocks(teacher_denoiser)],
        calls,
        settings,
        masks,
    )
    torch.manual_seed(settings.seed)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        max_steps=settings.steps,
        precision=settings.precision,  # type: ignore[arg-type]
        accumulate_grad_batches=settings.accumulate,
        gradient_clip_val=settings.gradient_clip or None,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(),
        num_sanity_val_steps=0,
    )
    loader: DataLoader[int] = DataLoader(order, batch_size=None)  # type: ignore[arg-type]
    trainer.fit(module, loader)
    student.eval()
    manifest = {**pruned.manifest, "recovery": asdict(settings) | {"prompts": len(prompts)}}
    result = RecoveryResult(
        steps=len(module.losses),
        seconds=time.perf_counter() - started,
        first_loss=module.losses[0],
        last_loss=module.losses[-1],
        peak_memory_bytes=peak_memory_bytes(device),
        calls_recorded=len(calls),
    )
    log.info(
        "recovery: %d steps in %.1f s, loss %.4g -> %.4g", result.steps, result.seconds,
        result.first_loss, result.last_loss,
    )  # fmt: skip
    return PrunedModel(recovered, adapter, manifest, pruned.result, result)
