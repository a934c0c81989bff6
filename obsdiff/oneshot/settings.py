"""The plain settings of a prune run, said once: the prune app's top-level keys take their
defaults from `PruneSettings` (the app layer registers it with Hydra), `obsdiff.prune` and
`obsdiff.memory_plan` take their keyword defaults from it, and both build their job with
`PruneSettings.job`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from obsdiff.calibration.sequential import CalibrationSettings, Offload, Placement
from obsdiff.methods.base import PruningMethod
from obsdiff.methods.granularity import Granularity
from obsdiff.methods.modulation import LowRankModulation
from obsdiff.models.base import ModelAdapter
from obsdiff.oneshot.job import JobError, PruneJob, check_layout
from obsdiff.oneshot.plan import GB, choose_packages, memory_plan
from obsdiff.prompts.files import BUNDLED_PROMPTS, PromptSet, load_prompts
from obsdiff.pruning.schedules import TimestepWeighting
from obsdiff.utils.devices import resolve_device
from obsdiff.utils.file_checks import unwritable_folder_problem


log = logging.getLogger(__name__)

AUTO = "auto"  # packages=auto: the fewest packages that fit memory_budget
BLOCKS_HINT = "blocks must be null (the granularity's default) or [start, end), e.g. blocks=[1,23]"


@dataclass
class PruneSettings:
    """What a prune run does, as plain values: the prune app's top-level keys and their defaults.

    Attributes:
        method: The default option of the `method` group (`obsdiff.prune`'s default method).
        granularity: The default option of the `granularity` group.
        weighting: The default option of the `weighting` group.
        modulation: The default option of the `modulation` group (`none`; `low_rank`: the
            modulation linears factorised, `obsdiff.methods.modulation`).
        sparsity: Target sparsity of the target linears, in [0, 1); N:M needs N / M.
        packages: Module packages (paper Sec. 4.2): 1 is one pass for everything, the number of
            basic units is layer by layer; `auto` takes the fewest whose predicted peak fits
            `memory_budget`.
        memory_budget: GB (1e9 bytes) of the device, for `packages=auto`; with a package count,
            a warning when the memory plan exceeds it.
        plan_only: Print the memory plan (from the model's config files) and stop.
        statistics_cache: A folder (e.g. `${paths.output_root}/statistics`): the first
            package's statistics computed once and reused by every job that shares them.
        offload: Where the work lives while pruning (`Offload`); the weights are the same.
        blocks: A `[start, end)` block range; null is the granularity's default (all blocks;
            structured SD3 and Flux keep the first and last).
        device: auto, cpu, cuda or cuda:N.
        save: Write the pruned denoiser (safetensors) and its manifest.
        keep_checkpoint: Keep `checkpoint/` (the resume state, a full copy of the denoiser)
            after a finished run.
    """

    method: str = "obsdiff"
    granularity: str = "unstructured"
    weighting: str = "log_decrease"
    modulation: str = "none"
    sparsity: float = 0.5
    packages: int | str = 4
    memory_budget: float | None = field(default=None, metadata={"example": 24, "minimum": 0.001})
    plan_only: bool = False
    statistics_cache: str | None = None
    offload: Offload = field(default_factory=Offload)
    blocks: tuple[int, int] | None = field(default=None, metadata={"hint": BLOCKS_HINT})
    device: str = "auto"
    save: bool = True
    keep_checkpoint: bool = False

    # the fields that are config groups in the apps (their default option), not values
    GROUPS: ClassVar[tuple[str, ...]] = ("method", "granularity", "weighting", "modulation")

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """The fields that are plain values (the prune app's top-level keys)."""
        return tuple(f.name for f in fields(cls) if f.name not in cls.GROUPS)

    def job(
        self,
        model: ModelAdapter,
        model_config: dict[str, Any],
        method: PruningMethod,
        granularity: Granularity,
        weighting: TimestepWeighting,
        prompts: PromptSet,
        calibration: CalibrationSettings,
        shard_solve: bool,
        reach_model: bool = True,
        components: dict[str, nn.Module] | None = None,
        modulation: LowRankModulation | None = None,
    ) -> PruneJob:
        """The checked job: every combination and the model's layout from its architecture
        alone (nothing loaded; `reach_model`: also that the checkpoint can be reached), the
        package count chosen for `memory_budget` with packages=auto (`components`: the
        pipeline's weightless components where the caller has built them already)."""
        auto = self.packages == AUTO
        if isinstance(self.packages, str) and not auto:
            raise JobError(f"packages={self.packages!r} is not an integer or auto; e.g. 4")
        if auto and self.memory_budget is None:
            raise JobError("packages=auto needs memory_budget=<GB of the device>, e.g. 24")
        statistics_cache = self._statistics_cache()
        job = PruneJob(
            model=model,
            model_config=model_config,
            method=method,
            granularity=granularity,
            sparsity=self.sparsity,
            weighting=weighting,
            packages=1 if auto else int(self.packages),
            prompts=prompts,
            calibration=calibration,
            device=resolve_device(self.device),
            blocks=self.blocks,
            save=self.save,
            keep_checkpoint=self.keep_checkpoint,
            statistics_cache=statistics_cache,
            placement=Placement(self.offload, shard_solve),
            modulation=modulation,
        )
        budget = None if self.memory_budget is None else self.memory_budget * GB
        if auto:
            assert budget is not None
            job = choose_packages(job, budget, components)  # fits by construction
        denoiser = None if components is None else model.denoiser_of(components)
        check_layout(job, reach_model, denoiser)
        if budget is None or auto:
            return job
        if not (plan := memory_plan(job, components)).fits(budget):
            log.warning(
                "predicted peak %.2f GB exceeds memory_budget=%g GB with packages=%d; "
                "packages=auto picks the fewest that fit",
                plan.predicted_peak_bytes / GB,
                budget / GB,
                job.packages,
            )
        return job

    def _statistics_cache(self) -> Path | None:
        """The statistics cache folder, checked: a folder, or a path one can be created at,
        that can be written (it is written after the first package's calibration)."""
        if self.statistics_cache is None:
            return None
        folder = Path(self.statistics_cache).expanduser()
        problem = unwritable_folder_problem(folder)
        if problem is not None:
            raise JobError(
                f"statistics_cache={self.statistics_cache} cannot be a folder of cached "
                f"statistics: {problem}; give a folder that can be written (created if missing), "
                "e.g. statistics_cache=outputs/statistics, or leave it null"
            )
        return folder


def calibration_prompts(settings: CalibrationSettings) -> PromptSet:
    """The calibration set `settings` names (the bundled demo prompts for `bundled`)."""
    return load_prompts(
        BUNDLED_PROMPTS if settings.prompts == "bundled" else settings.prompts,
        num_prompts=settings.num_prompts,
        fmt=settings.format,
        column=settings.column,
        selection=settings.selection,
        seed=settings.seed,
    )
