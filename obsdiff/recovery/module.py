"""The distillation loop as a LightningModule: the frozen teacher, the student, the recorded
calls; a sparse student's mask kept exactly."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch import nn

from obsdiff.recovery.data import DenoiserCall
from obsdiff.recovery.losses import block_outputs, feature_loss, prediction
from obsdiff.recovery.settings import RecoverySettings


log = logging.getLogger(__name__)


class Distillation(L.LightningModule):
    """Student towards teacher on the teacher's own denoiser calls.

    `masks`: the student's pruned weights (qualified parameter name -> True where a weight is
    kept) of an unstructured or N:M prune; their gradients are zeroed before every optimizer
    step and the weights multiplied by the mask after it, so they stay exact zeros (AdamW alone
    would keep them at zero too, from a zero gradient and a zero weight; the mask makes it
    exact whatever the optimizer). A structured student has none: every weight trains."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_blocks: list[nn.Module],
        teacher_blocks: list[nn.Module],
        calls: list[DenoiserCall],
        settings: RecoverySettings,
        masks: dict[str, torch.Tensor],
    ) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.student_blocks, self.teacher_blocks = student_blocks, teacher_blocks
        self.calls = calls
        self.settings = settings
        self.masks = masks
        self.losses: list[float] = []  # every optimizer step's loss, in order

    def on_fit_start(self) -> None:
        self.masks = {name: mask.to(self.device) for name, mask in self.masks.items()}
        self.teacher.eval()  # frozen, dropout off, whatever mode the Trainer sets

    def training_step(self, index: torch.Tensor, batch_idx: int) -> torch.Tensor:
        call = self.calls[int(index)].to(self.device)
        s = self.settings
        with torch.no_grad(), block_outputs(self.teacher_blocks) as teacher_features:
            target = prediction(self.teacher(*call.args, **call.kwargs))
        with block_outputs(self.student_blocks) as student_features:
            output = prediction(self.student(*call.args, **call.kwargs))
        loss = s.output_weight * nn.functional.mse_loss(output.float(), target.float())
        if s.feature_weight > 0:
            pairs = [
                (st, te) for st, te in zip(student_features, teacher_features, strict=True) if st
            ]
            features = [feature_loss(st, te, s.massive_sigma) for st, te in pairs]
            if features:
                loss = loss + s.feature_weight * torch.stack(features).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the recovery diverged: loss {loss.item()} at step {self.global_step}; lower "
                "recover.lr or turn on recover.gradient_clip"
            )
        self.log("recover/loss", loss.detach(), prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if outputs is not None and (batch_idx + 1) % self.settings.accumulate == 0:
            self.losses.append(float(outputs["loss"]))
            step = len(self.losses)
            if step == 1 or step % self.settings.log_every == 0 or step == self.settings.steps:
                log.info(
                    "recovery step %d/%d: loss %.6g", step, self.settings.steps, self.losses[-1]
                )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        parameters = dict(self.student.named_parameters())
        for name, mask in self.masks.items():
            grad = parameters[name].grad
            if grad is not None:
                grad.mul_(mask)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():
            parameters = dict(self.student.named_parameters())
            for name, mask in self.masks.items():
                parameters[name].mul_(mask)

    def configure_optimizers(self) -> Any:
        s = self.settings
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=s.lr, weight_decay=s.weight_decay)

        def warmup(step: int) -> float:
            return min(1.0, (step + 1) / s.warmup_steps) if s.warmup_steps > 0 else 1.0

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
