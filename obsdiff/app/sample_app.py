"""The sample app's task (`python -m obsdiff.sample`, conf/sample.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from obsdiff.app.config import ConfigError, instantiate_model, settings
from obsdiff.app.shell import RunContext, execute
from obsdiff.artifacts.record import RunRecord
from obsdiff.eval.generation import sample_to_dir
from obsdiff.models.base import ModelAdapter
from obsdiff.utils.devices import resolve_device


@dataclass
class SampleSettings:
    """The sample app's keys (their values: conf/sample.yaml)."""

    prompts: str | list[str]
    seed: int = field(metadata={"example": 0})
    batch_size: int = field(metadata={"example": 4, "minimum": 1})
    device: str


@dataclass
class SampleJob:
    model: ModelAdapter
    prompts: list[str]
    seed: int
    batch_size: int


def sample(job: SampleJob, context: RunContext) -> RunRecord:
    samples = sample_to_dir(
        job.model, job.prompts, job.seed, job.batch_size, context.device, context.out
    )
    return RunRecord("completed", images=len(samples.images))


def task(cfg: DictConfig) -> None:
    """Images for the config's prompts."""

    def validate() -> tuple[SampleJob, torch.device]:
        model = instantiate_model(cfg.model)
        given = settings(cfg, SampleSettings, only=("prompts", "seed", "batch_size", "device"))
        prompts = [given.prompts] if isinstance(given.prompts, str) else given.prompts
        if not prompts:
            raise ConfigError("prompts is empty; give at least one, e.g. 'prompts=[a red circle]'")
        model.check_source()  # the model's files are reachable (a clear error if not)
        job = SampleJob(model, prompts, given.seed, given.batch_size)
        return job, resolve_device(given.device)

    execute(cfg, validate, sample)
