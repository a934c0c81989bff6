"""A pruned model recovered: its denoiser distilled towards the dense one on the dense model's
own trajectories (data-free), on Lightning Fabric (`obsdiff.recovery.loop`)."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.loggers import Logger
from peft import PeftModel
from torch import nn

from obsdiff.artifacts.pruned import PrunedModel
from obsdiff.artifacts.record import RecoveryResult
from obsdiff.models.base import ModelAdapter
from obsdiff.models.experts import check_one_denoiser
from obsdiff.prompts.image_folder import read_image_folder
from obsdiff.recovery.checkpoint import RecoveryCheckpoint, recovery_key
from obsdiff.recovery.data import DenoiserCall, draw_calls, record_calls, step_density
from obsdiff.recovery.images import encode_images
from obsdiff.recovery.loop import distil
from obsdiff.recovery.lora import check_lora_rank, lora_targets, merged, with_lora
from obsdiff.recovery.settings import RecoverySettings
from obsdiff.recovery.sharding import device_mesh, gather_into, shard
from obsdiff.runners.parallel import DataParallel
from obsdiff.utils.memory import peak_memory_bytes, reset_peak_memory


log = logging.getLogger(__name__)


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


def _training_inputs(
    adapter: ModelAdapter,
    teacher: Any,
    prompts: list[str],
    pairs: list[tuple[Path, str]],
    settings: RecoverySettings,
    batch_size: int,
    device: torch.device,
    parallel: DataParallel,
) -> tuple[Callable[[int], DenoiserCall], int]:
    """The training draw (its index -> a denoiser call) and the count of recorded calls: the
    teacher's trajectories for `prompts` (data-free), or the images of `pairs` (encoded once)."""
    if pairs:
        images = encode_images(adapter, teacher, pairs, batch_size, device)
        log.info("recovery: %d images encoded; %d steps", len(pairs), settings.steps)

        def from_images(index: int) -> DenoiserCall:
            return images.draw(adapter, index, batch_size, settings.seed, settings.caption_dropout)

        return from_images, 0
    calls = record_calls(teacher, adapter, prompts, batch_size, settings.seed, device)
    density = step_density(teacher, adapter.denoising_steps(teacher))
    draws = settings.steps * settings.accumulate * parallel.world_size
    order = draw_calls(calls, density, draws, settings.seed)
    log.info(
        "recovery: %d teacher calls recorded from %d prompts; %d steps", len(calls), len(prompts),
        settings.steps,
    )  # fmt: skip
    return (lambda index: calls[order[index]]), len(calls)


def recover_pruned(
    pruned: PrunedModel,
    teacher: Any,
    prompts: list[str],
    settings: RecoverySettings,
    device: torch.device,
    batch_size: int = 1,
    run_dir: Path | None = None,
    loggers: list[Logger] | None = None,
    parallel: DataParallel | None = None,
) -> PrunedModel:
    """`pruned` with its denoiser distilled towards `teacher` (the dense pipeline of the same
    base model), on the teacher's trajectories for `prompts`; the pruned model itself is left
    as it was. The teacher's text encoders and VAE go back to the CPU once the trajectories
    are recorded (`obsdiff.recovery.plan`). With `run_dir`, a resume checkpoint lives there
    while it works (an interrupted recovery continues from it to the same weights; the caller
    removes it once done). `loggers` (Lightning's) receive every step's loss. With `parallel`
    (the runner's processes), every rank records the same trajectories and trains on its own
    share of each step's calls (`distil`). Returns the recovered model: its manifest with a
    `recovery` section (the settings), `recovery` what it did."""
    adapter = pruned.adapter
    check_one_denoiser(pruned.denoiser, adapter.name)
    targets = lora_targets(adapter, pruned.denoiser) if settings.lora_rank else []
    if targets:  # before the work: a rank wider than a layer named at once
        check_lora_rank(pruned.denoiser, targets, settings.lora_rank)
    pairs = [] if settings.images is None else read_image_folder(settings.images)
    checkpoint = None
    if run_dir is not None:
        checkpoint = RecoveryCheckpoint(
            run_dir, recovery_key(pruned.manifest.get("run_key"), prompts, settings)
        )
        checkpoint.check()  # before the work: a damaged checkpoint named at once
    started = time.perf_counter()
    reset_peak_memory(device)
    parallel = parallel or DataParallel()
    teacher_denoiser: nn.Module = adapter.denoiser(teacher)
    named_blocks = adapter.blocks(teacher_denoiser)
    teacher_blocks = [b for _, b in named_blocks]
    removed = set(pruned.manifest.get("structure", {}).get("removed_blocks", []))
    # each student block against the teacher block it was (depth pruning removed the others)
    matched = [b for name, b in named_blocks if name not in removed]
    if parallel.fsdp:  # the teacher denoiser sharded (block by block to the device), the rest whole
        for name, component in teacher.components.items():
            if isinstance(component, nn.Module) and name != adapter.denoiser_attr:
                component.to(device)
        shard(teacher_denoiser, teacher_blocks, device_mesh(device, parallel.world_size))
    else:
        teacher = teacher.to(device)
    teacher.set_progress_bar_config(disable=True)
    draw, calls = _training_inputs(
        adapter, teacher, prompts, pairs, settings, batch_size, device, parallel
    )
    for name, component in teacher.components.items():  # used once: off the device to train
        if isinstance(component, nn.Module) and name != adapter.denoiser_attr:
            component.to("cpu")
    components = dict(pruned.pipeline.components)  # shared: only the denoiser trains
    components[adapter.denoiser_attr] = copy.deepcopy(pruned.denoiser)
    recovered = type(pruned.pipeline)(**components)
    dtype = next(pruned.denoiser.parameters()).dtype
    # float32 master weights whatever the model's dtype: AdamW's small steps would vanish in
    # bfloat16 weights; `precision` decides the arithmetic, the weights are saved back in `dtype`
    # (a sharded student goes to the device block by block as it is sharded)
    student: nn.Module = adapter.denoiser(recovered).to(
        torch.device("cpu") if parallel.fsdp else device, torch.float32
    )
    blocks = [b for _, b in adapter.blocks(student)]
    masks = kept_weights(PrunedModel(recovered, adapter, pruned.manifest))
    torch.manual_seed(settings.seed)
    trained: nn.Module = student
    if targets:  # only the adapters train; a sparse student's keep its mask
        trained = with_lora(
            student, targets, settings.lora_rank, settings.lora_alpha, masked=bool(masks)
        )
    losses = distil(
        trained,
        teacher_denoiser,
        blocks,
        matched,
        draw,
        settings,
        {} if targets else masks,  # frozen under LoRA: only their adapters' deltas are masked
        device,
        checkpoint,
        loggers,
        parallel,
    )
    if parallel.fsdp:  # every rank's full weights, in a plain denoiser of the student's own
        plain = copy.deepcopy(pruned.denoiser).to(torch.float32)
        if targets:
            plain = with_lora(plain, targets, settings.lora_rank, settings.lora_alpha, bool(masks))
        trained = gather_into(trained, plain)
        student = trained
    if isinstance(trained, PeftModel):
        student = merged(trained)
    recovered.register_modules(**{adapter.denoiser_attr: student})
    student.to(dtype)  # a cast keeps the zeros of a sparse student exact
    manifest = {**pruned.manifest, "recovery": asdict(settings) | {"prompts": len(prompts)}}
    result = RecoveryResult(
        steps=len(losses),
        seconds=time.perf_counter() - started,
        first_loss=losses[0],
        last_loss=losses[-1],
        peak_memory_bytes=peak_memory_bytes(device),
        calls_recorded=calls,
        images=len(pairs),
        world_size=parallel.world_size,
        sharded=parallel.fsdp,
    )
    log.info(
        "recovery: %d steps in %.1f s, loss %.4g -> %.4g", result.steps, result.seconds,
        result.first_loss, result.last_loss,
    )  # fmt: skip
    return PrunedModel(recovered, adapter, manifest, pruned.result, result)
