"""The distillation loop, on Lightning Fabric: the frozen teacher, the student, the recorded
calls in a seeded order; a sparse student's mask kept exactly; a checkpoint (safetensors plus
JSON) every few steps, from which a resumed run continues to the same weights.

Fabric rather than the Trainer: the loop is a few lines of its own (one draw of a recorded call
per micro-batch, in an order fixed by the seed), its checkpoints are safetensors files and JSON
(the Trainer's are pickles), and Ctrl-C or SIGTERM must reach the app's shell, which records the
run as interrupted (the Trainer turns Ctrl-C into exit code 1 and ignores a second one). Fabric
still brings the precision (`32`, `bf16-mixed`, `16-mixed` with its scaler), gradient clipping
and the device placement. Several processes (the runner's) are this loop's own: DDP's arithmetic
as one all-reduce a step, FSDP as PyTorch's FSDP2 `fully_shard` (`obsdiff.recovery.sharding`):
Fabric's FSDP strategy wraps the model in the older `FullyShardedDataParallel` on a CUDA mesh
only, where FSDP2's DTensor shards let a mask follow its weight and run on gloo in the tests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning as L
import torch
from lightning.fabric.loggers import Logger
from torch import nn

from obsdiff.models.base import prediction
from obsdiff.recovery.checkpoint import RecoveryCheckpoint
from obsdiff.recovery.data import DenoiserCall
from obsdiff.recovery.losses import block_outputs, feature_loss
from obsdiff.recovery.settings import RecoverySettings
from obsdiff.recovery.sharding import device_mesh, shard, sharded_like
from obsdiff.runners.parallel import DataParallel
from obsdiff.utils.progress import progress


log = logging.getLogger(__name__)


class Divergence(FloatingPointError):
    """The loss became NaN or infinite."""


def distillation_loss(
    student: Callable[..., object],
    teacher: nn.Module,
    student_blocks: list[nn.Module],
    teacher_blocks: list[nn.Module],
    call: DenoiserCall,
    settings: RecoverySettings,
    student_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`output_weight` x MSE(student's prediction, teacher's) + `feature_weight` x the mean over
    the blocks of the per-token normalised feature loss (+ `task_weight` x MSE(student's
    prediction, the call's training target), for a call made from an image), on one call: the
    teacher called as the pipeline called it; the student with its floating inputs in
    `student_dtype`, its float32 master weights' where the model's dtype is half (an exact
    upcast)."""
    with torch.no_grad(), block_outputs(teacher_blocks) as teacher_features:
        target = prediction(teacher(*call.args, **call.kwargs))
    if student_dtype is not None:
        call = call.to(target.device, student_dtype)
    with block_outputs(student_blocks) as student_features:
        output = prediction(student(*call.args, **call.kwargs))
    loss = settings.output_weight * nn.functional.mse_loss(output.float(), target.float())
    if settings.task_weight > 0 and call.target is not None:
        truth = call.target.float()
        if output.shape[1] == 2 * truth.shape[1]:  # a learned variance (PixArt): the mean half
            output = output[:, : truth.shape[1]]
        loss = loss + settings.task_weight * nn.functional.mse_loss(output.float(), truth)
    if settings.feature_weight > 0:
        features = [
            feature_loss(s, t, settings.massive_sigma)
            for s, t in zip(student_features, teacher_features, strict=True)
            if s
        ]
        if features:
            loss = loss + settings.feature_weight * torch.stack(features).mean()
    return loss


def done_at(checkpoint: RecoveryCheckpoint) -> int:
    """The step of the checkpoint's last commit (0: none yet)."""
    progress = checkpoint.check()
    return 0 if progress is None else int(progress["step"])


def distil(
    student: nn.Module,
    teacher: nn.Module,
    student_blocks: list[nn.Module],
    teacher_blocks: list[nn.Module],
    draw: Callable[[int], DenoiserCall],
    settings: RecoverySettings,
    masks: dict[str, torch.Tensor],
    device: torch.device,
    checkpoint: RecoveryCheckpoint | None = None,
    loggers: list[Logger] | None = None,
    parallel: DataParallel | None = None,
) -> list[float]:
    """Train `student` towards `teacher` for `settings.steps` optimizer steps, step i on the
    calls `draw(i * accumulate + m)` for m < accumulate; returns every step's loss.

    `masks` (parameter name -> True where a weight is kept: an unstructured or N:M student):
    their gradients are zeroed before each optimizer step and the weights multiplied by the
    mask after it, so pruned weights stay exact zeros. With `checkpoint`, the run continues
    from its last complete step, and a checkpoint is written every `checkpoint_every` steps.
    `loggers` (Lightning's, e.g. its WandbLogger) receive every step's loss and learning rate
    as `recover/loss` and `recover/lr`.

    Data parallel (`parallel`: the processes the runner launched, `runner=ddp`): rank r's
    micro-batch m of step i is the call `draw((i * accumulate + m) * world_size + r)`, and the
    gradients are averaged over the ranks before clipping (DDP's arithmetic, one all-reduce a
    step), so every rank takes the same step: the same weights as one process accumulating
    `world_size` times more, to float round-off. Rank 0 writes the checkpoints. With
    `parallel.fsdp` the student is sharded over the ranks first (`obsdiff.recovery.sharding`;
    the teacher the caller has sharded), and FSDP averages the gradients: the same step, and
    `student` is left sharded."""
    parallel = parallel or DataParallel()
    world = parallel.world_size
    fabric = L.Fabric(
        accelerator="cuda" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        precision=settings.precision,  # type: ignore[arg-type]
        loggers=loggers,
    )
    teacher.eval().requires_grad_(False)
    if settings.gradient_checkpointing:
        enable_checkpointing(student)
    if parallel.fsdp:  # before the optimizer: it steps the shards
        shard(student, student_blocks, device_mesh(device, world))
    student.train()
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)

    def warmup(step: int) -> float:
        return min(1.0, (step + 1) / settings.warmup_steps) if settings.warmup_steps else 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
    losses: list[float] = []
    done = 0
    if checkpoint is not None:
        done, losses = checkpoint.restore(student, optimizer, scheduler)
    model, optimizer = fabric.setup(student, optimizer)
    dtype = next(student.parameters()).dtype
    upcast = None if dtype == next(teacher.parameters()).dtype else dtype
    parameters = dict(student.named_parameters())
    masked = {
        name: (parameters[name], sharded_like(mask, parameters[name]))
        for name, mask in masks.items()
    }
    for step in progress(range(done, settings.steps), "recovery", "step"):
        total = 0.0
        for micro in range(settings.accumulate):
            index = (step * settings.accumulate + micro) * world + parallel.rank
            call = draw(index).to(device)
            with fabric.autocast():
                loss = distillation_loss(
                    model, teacher, student_blocks, teacher_blocks, call, settings, upcast
                )
            fabric.backward(loss / settings.accumulate)
            total += float(loss.detach()) / settings.accumulate
        if world > 1:  # every rank's gradients (FSDP's own averaged them) and loss, averaged
            reduced = [] if parallel.fsdp else [p.grad for p in trainable if p.grad is not None]
            reduced.append(torch.tensor([total], dtype=torch.float64, device=device))
            parallel.all_reduce_(reduced)
            for tensor in reduced:
                tensor.div_(world)
            total = float(reduced[-1])
        if not torch.isfinite(torch.tensor(total)):
            kept = f"; the checkpoint of step {done_at(checkpoint)} is kept" if checkpoint else ""
            raise Divergence(
                f"the recovery diverged: loss {total} at step {step + 1}{kept}; lower recover.lr "
                "or clip the gradients (recover.gradient_clip), and start it again"
            )
        for weight, mask in masked.values():
            if weight.grad is not None:
                weight.grad.mul_(mask)
        if settings.gradient_clip > 0:
            fabric.clip_gradients(model, optimizer, max_norm=settings.gradient_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        with torch.no_grad():
            for weight, mask in masked.values():
                weight.mul_(mask)
        losses.append(total)
        finished = step + 1
        fabric.log_dict({"recover/loss": total, "recover/lr": lr}, step=finished)
        if finished == 1 or finished % settings.log_every == 0 or finished == settings.steps:
            log.info("recovery step %d/%d: loss %.6g", finished, settings.steps, total)
        if checkpoint is not None and (
            finished % settings.checkpoint_every == 0 or finished == settings.steps
        ):  # every rank: a sharded student is gathered; rank 0 writes
            checkpoint.save(finished, student, optimizer, scheduler, losses, parallel.is_main)
    student.eval()
    if settings.gradient_checkpointing:
        student.disable_gradient_checkpointing()  # type: ignore[operator]
    return losses


def enable_checkpointing(student: nn.Module) -> None:
    """diffusers' gradient checkpointing of the denoiser's blocks (every family obsdiff knows
    has it); a model without it is refused, naming the setting."""
    if not getattr(student, "_supports_gradient_checkpointing", False):
        raise ValueError(
            f"recover.gradient_checkpointing: {type(student).__name__} has no gradient "
            "checkpointing; set recover.gradient_checkpointing=false"
        )
    student.enable_gradient_checkpointing()  # type: ignore[operator]
