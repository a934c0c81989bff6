"""The recovery's resume checkpoint: the student's weights and the optimizer's tensors in
safetensors files, every other piece of state (the step, the losses, the optimizer's and the
schedule's scalars) in `progress.json`, never a pickle. As the prune's checkpoint:
`progress.json` is the commit point (the weights of step k go to files of their own, then
progress.json names them, then the previous files go), so an interruption at any moment leaves
a checkpoint that loads; `key` ties it to the settings that wrote it."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import safetensors.torch
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from obsdiff.recovery.settings import RecoverySettings
from obsdiff.utils.file_checks import safetensors_problem
from obsdiff.utils.io import save_tensors, write_json


log = logging.getLogger(__name__)

RECOVERY_CHECKPOINT = "recovery-checkpoint"
PROGRESS = "progress.json"
NEUTRAL_SETTINGS = ("log_every", "checkpoint_every")  # a resume may change these
FORMAT = 2  # the optimizer's state keyed by parameter name (1: by index, before sharding)


def recovery_key(run_key: str | None, prompts: list[str], settings: RecoverySettings) -> str:
    """What a recovery computes from: the pruned model (its prune's `run_key`), the prompts,
    the settings that change the weights."""
    chosen = {k: v for k, v in asdict(settings).items() if k not in NEUTRAL_SETTINGS}
    text = json.dumps([run_key, prompts, chosen], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RecoveryCheckpointError(ValueError):
    """A checkpoint that a resume cannot use: its file and the fix."""


class RecoveryCheckpoint:
    """The checkpoint folder of one recovery (`run_dir/recovery-checkpoint`)."""

    def __init__(self, run_dir: Path, key: str) -> None:
        self.dir = run_dir / RECOVERY_CHECKPOINT
        self.key = key

    def save(
        self,
        step: int,
        student: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        losses: list[float],
        write: bool = True,
    ) -> None:
        """The state after `step`, written when `write` (rank 0). Every rank of a sharded
        student calls it: the full tensors are gathered (a collective), to rank 0's CPU."""
        model_state, optimizer_state = cast(
            "tuple[dict[str, torch.Tensor], dict[str, Any]]",
            get_state_dict(student, optimizer, options=_options(student)),
        )
        if not write:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        weights, state = f"student-{step}.safetensors", f"optimizer-{step}.safetensors"
        tensors = {
            f"{parameter}.{name}": value
            for parameter, values in optimizer_state["state"].items()
            for name, value in values.items()
        }
        save_tensors(self.dir / weights, model_state)
        save_tensors(self.dir / state, tensors)
        write_json(
            self.dir / PROGRESS,
            {
                "format": FORMAT,
                "key": self.key,
                "step": step,
                "losses": losses,
                "weights": weights,
                "optimizer": state,
                "param_groups": optimizer_state["param_groups"],
                "scheduler": scheduler.state_dict(),
            },
        )
        for old in self.dir.glob("*.safetensors"):
            if old.name not in (weights, state):
                old.unlink()

    def check(self) -> dict[str, Any] | None:
        """The progress of a checkpoint a resume can use (None: no checkpoint), or one
        RecoveryCheckpointError naming the file and the fix; no tensor is read."""
        progress_file = self.dir / PROGRESS
        if not progress_file.is_file():
            return None
        fix = f"delete {self.dir}/ to start the recovery again, or start a new run"
        try:
            progress = json.loads(progress_file.read_text())
            files = [self.dir / progress["weights"], self.dir / progress["optimizer"]]
            step, key = int(progress["step"]), progress["key"]
        except (ValueError, KeyError, TypeError):
            raise RecoveryCheckpointError(f"{progress_file} is damaged: {fix}") from None
        if progress.get("format") != FORMAT:
            raise RecoveryCheckpointError(
                f"{progress_file} was written by an older obsdiff, in another layout: {fix}"
            )
        if key != self.key:
            raise RecoveryCheckpointError(
                f"{self.dir} holds the checkpoint of a recovery with other settings: {fix}"
            )
        for path in files:
            problem = safetensors_problem(path)
            if problem is not None:
                raise RecoveryCheckpointError(f"{path} is damaged ({problem}): {fix}")
        if not 0 < step:
            raise RecoveryCheckpointError(f"{progress_file} is damaged (step {step}): {fix}")
        return dict(progress)

    def restore(
        self,
        student: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> tuple[int, list[float]]:
        """The student, optimizer and schedule as the checkpoint left them; the steps done and
        their losses ((0, []) when there is no checkpoint). Every rank of a sharded student
        reads the full tensors and keeps its shards."""
        progress = self.check()
        if progress is None:
            return 0, []
        weights: dict[str, Any] = safetensors.torch.load_file(str(self.dir / progress["weights"]))
        tensors = safetensors.torch.load_file(str(self.dir / progress["optimizer"]))
        state: dict[str, Any] = {}
        for name, value in tensors.items():
            parameter, key = name.rsplit(".", 1)
            state.setdefault(parameter, {})[key] = value
        set_state_dict(
            student,
            optimizer,
            model_state_dict=weights,
            optim_state_dict={"state": state, "param_groups": progress["param_groups"]},
            options=_options(student),
        )
        scheduler.load_state_dict(progress["scheduler"])
        log.info("recovery: resuming after step %d of the checkpoint", progress["step"])
        return int(progress["step"]), [float(x) for x in progress["losses"]]


def _options(student: nn.Module) -> StateDictOptions:
    """Full tensors, keyed by parameter name (the optimizer's too); only what trains (LoRA's
    adapters, not the frozen weights a resume rebuilds from the pruned model: then a restore
    expects them missing); a sharded student's gathered to rank 0's CPU."""
    parameters = list(student.parameters())
    return StateDictOptions(
        full_state_dict=True,
        cpu_offload=any(isinstance(p, DTensor) for p in parameters),
        ignore_frozen_params=True,
        strict=all(p.requires_grad for p in parameters),
    )


def remove_recovery_checkpoint(run_dir: Path) -> None:
    """The recovery's checkpoint of `run_dir` removed (once the recovered model is saved)."""
    shutil.rmtree(run_dir / RECOVERY_CHECKPOINT, ignore_errors=True)
