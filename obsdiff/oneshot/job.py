"""A prune job: typed settings, checked in every combination before any weights are loaded
(the model's layout from its architecture alone), and the key that names its result."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from obsdiff.calibration.packages import UnitRef, list_units, split_packages
from obsdiff.calibration.sequential import CalibrationSettings, Placement
from obsdiff.methods.base import PruningMethod
from obsdiff.methods.granularity import Granularity
from obsdiff.methods.modulation import LowRankModulation
from obsdiff.methods.obs_diff import NO_TOKEN_WEIGHTING
from obsdiff.methods.package import Depth, Structured, Target
from obsdiff.models.base import ModelAdapter
from obsdiff.models.experts import Experts
from obsdiff.models.structure import linear_at
from obsdiff.prompts.files import PromptSet
from obsdiff.pruning.obs_structured import aligned_count, structured_count
from obsdiff.pruning.patterns import NM
from obsdiff.pruning.schedules import TimestepWeighting
from obsdiff.pruning.statistics import HESSIAN_PRECISIONS


log = logging.getLogger(__name__)


class JobError(ValueError):
    """The combination of settings cannot run; raised before any model is loaded."""


@dataclass
class PruneJob:
    """A prune run's typed settings, checked in every combination (`PruneSettings.job` builds
    it from the plain settings, for the apps and the Python API alike)."""

    model: ModelAdapter
    model_config: dict[str, Any]
    method: PruningMethod
    granularity: Granularity
    sparsity: float
    weighting: TimestepWeighting
    packages: int
    prompts: PromptSet
    calibration: CalibrationSettings
    device: torch.device
    blocks: tuple[int, int] | None
    save: bool
    keep_checkpoint: bool
    statistics_cache: Path | None  # a folder: the first package's statistics reused
    placement: Placement  # where the work lives (not part of the key)
    modulation: LowRankModulation | None = None  # the modulation linears factorised too

    def __post_init__(self) -> None:
        try:
            self.method.check_granularity(self.granularity.kind)
            self.target: Target = self.granularity.target(self.sparsity)
            self.weighting.step_weights(self.model.sampling.num_inference_steps)
        except ValueError as err:
            raise JobError(str(err)) from err
        if self.packages < 1:
            raise JobError(f"packages={self.packages} must be >= 1")
        if self.blocks is not None and not (0 <= self.blocks[0] < self.blocks[1]):
            raise JobError(f"blocks={list(self.blocks)} must be [start, end) with 0 <= start < end")
        if self.calibration.hessian_precision not in HESSIAN_PRECISIONS:
            raise JobError(
                f"calibration.hessian_precision={self.calibration.hessian_precision!r}; use one "
                f"of {HESSIAN_PRECISIONS}"
            )
        if self.calibration.batch_size < 1:
            raise JobError(f"calibration.batch_size={self.calibration.batch_size} must be >= 1")
        if self.modulation is not None and not self.model.modulation_patterns:
            raise JobError(
                f"modulation=low_rank: the {self.model.family} family has no table of modulation "
                "linears; use modulation=none"
            )

    @property
    def calibrates(self) -> bool:
        """Whether the run makes calibration passes: for the method's statistics, the
        modulation's, or a depth criterion's."""
        depth = isinstance(self.target, Depth)  # its criterion's pass
        return self.method.needs_calibration or self.modulation is not None or depth

    def settings(self) -> dict[str, Any]:
        """The settings that change the pruned weights, and only those (not where the run is
        written, on which device, with what logging): what `run_key` hashes."""
        steps = self.model.sampling.num_inference_steps
        return {
            "model": self.model_config,
            "method": self.method.describe(),
            "granularity": self.granularity.name,
            "sparsity": self.sparsity,
            "weighting": self.weighting.describe(steps),
            "packages": self.packages,
            "blocks": None if self.blocks is None else list(self.blocks),
            "prompts_sha256": self.prompts.describe()["prompts_sha256"],
            "calibration": self.calibration.run_settings(),
        } | ({} if self.modulation is None else {"modulation": self.modulation.describe()})

    def first_package_identity(
        self, first: list[UnitRef], world_size: int, weights: str | None = None
    ) -> dict[str, Any]:
        """Everything the first package's statistics depend on (it sees the dense model):
        `obsdiff.calibration.cache`'s key. Not the method, granularity or sparsity, but a
        method's token weighting (`ObsDiff.token_weighting`), which weights its Hessians.
        `weights`: a hash of a pipeline in memory's weights (a checkpoint's files name its
        own)."""
        settings = self.settings()
        token_weighting = getattr(self.method, "token_weighting", NO_TOKEN_WEIGHTING)
        return {
            "model": settings["model"],
            "weights": weights or self.model.weights_fingerprint(),
            "weighting": settings["weighting"],
            "prompts_sha256": settings["prompts_sha256"],
            "calibration": settings["calibration"],
            "groups": [[f"{u.block_name}.{n}" for n in group] for u in first for group in u.groups],
            "world_size": world_size,
            "device": self.device.type,
        } | ({} if token_weighting == NO_TOKEN_WEIGHTING else {"token_weighting": token_weighting})

    @property
    def run_key(self) -> str:
        """Hash of `settings()`: a checkpoint or saved model of another key is another run."""
        text = json.dumps(self.settings(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan_packages(
    job: PruneJob, denoiser: nn.Module
) -> tuple[list[list[UnitRef]], list[tuple[str, nn.Linear]]]:
    """The packages and target linears of `job` on `denoiser`, with every layout check (block
    range, package count, N:M columns, head and FFN widths). Works on the weightless skeleton
    (`check_layout`) as on the loaded denoiser."""
    if job.modulation is not None:
        try:
            job.modulation.check_widths(denoiser, job.model.modulation_linears(denoiser))
        except ValueError as err:
            raise JobError(str(err)) from err
    if isinstance(job.target, Depth):  # whole blocks: no packages, no target linears
        depth_candidates(job, denoiser)
        return [], []
    try:
        job.method.check_model(job.model)
    except ValueError as err:
        raise JobError(str(err)) from err
    structured = isinstance(job.target, Structured)
    try:
        units = list_units(job.model, denoiser, job.blocks, structured=structured)
        packages = split_packages(units, job.packages)
    except ValueError as err:
        raise JobError(str(err)) from err
    targets = _target_modules(denoiser, packages)
    if structured:
        assert isinstance(job.target, Structured)
        removed, total = _check_structured(
            job.model, denoiser, units, job.sparsity, job.target.align
        )
        try:
            job.method.check_counts(removed, total)
        except ValueError as err:
            raise JobError(f"method={job.method.name} sparsity={job.sparsity}: {err}") from err
    else:
        _check_nm_columns(targets, job.target)
    return packages, targets


def depth_candidates(job: PruneJob, denoiser: nn.Module) -> tuple[list[str], int]:
    """Depth pruning's candidate blocks (`blocks`, by default all but the first and the last)
    and how many go: round(blocks x sparsity), as structured counts round; JobError when the
    family's blocks cannot be removed or the count would take every candidate."""
    if not job.model.depth_lists:
        raise JobError(
            f"granularity=depth: the {job.model.family} family has no table of removable "
            "blocks; use granularity=structured (heads and FFN neurons)"
        )
    if isinstance(denoiser, Experts):
        raise JobError(
            f"granularity=depth: {job.model.name} has {len(list(denoiser.children()))} timestep "
            "experts, each run on its own steps; depth pruning scores one denoiser's blocks. "
            "Prune the experts' widths (granularity=unstructured, semi_2_4 or structured)"
        )
    names = [name for name, _ in job.model.blocks(denoiser)]
    start, end = job.blocks or job.model.default_blocks(len(names), structured=True)
    if not 0 <= start < end <= len(names):
        raise JobError(
            f"blocks=[{start},{end}) is outside the model's {len(names)} blocks; use 0 <= start "
            f"< end <= {len(names)}"
        )
    candidates = names[start:end]
    count = structured_count(len(names), job.sparsity)
    if count >= len(candidates):
        raise JobError(
            f"sparsity={job.sparsity} would remove {count} of {len(names)} blocks (round("
            f"{len(names)} x {job.sparsity})), every one of the {len(candidates)} that may go "
            f"(blocks [{start},{end})); use a sparsity below "
            f"{(len(candidates) - 0.5) / len(names):.3f}"
        )
    return candidates, count


def check_layout(
    job: PruneJob, reach_model: bool = True, denoiser: nn.Module | None = None
) -> None:
    """Every layout check of `plan_packages` on the model's architecture alone (`denoiser`, by
    default built from its config on the meta device, or the tiny recipe): before any weights
    are loaded; with `reach_model`, also that its checkpoint can be reached
    (`ModelAdapter.check_source`)."""
    plan_packages(job, job.model.denoiser_skeleton() if denoiser is None else denoiser)
    if reach_model:
        job.model.check_source()


def _target_modules(
    denoiser: nn.Module, packages: list[list[UnitRef]]
) -> list[tuple[str, nn.Linear]]:
    return [
        (name, linear_at(denoiser, name))
        for package in packages
        for unit in package
        for name in unit.module_names
    ]


def _check_nm_columns(targets: list[tuple[str, nn.Linear]], pattern: Target) -> None:
    if isinstance(pattern, NM):
        for name, module in targets:
            if module.in_features % pattern.m:
                raise JobError(
                    f"{name} has {module.in_features} inputs, not divisible by M={pattern.m} of "
                    f"{pattern.n}:{pattern.m}; exclude its block with blocks=[start,end)"
                )


def _check_structured(
    adapter: ModelAdapter,
    denoiser: nn.Module,
    units: list[UnitRef],
    sparsity: float,
    align: int | None = None,
) -> tuple[int, int]:
    """Every head group splits evenly into heads, every FFN into its recorded width, and the
    sparsity (rounded to `align`) leaves at least one head and one neuron in each; returns the
    units it removes and the units there are, over all groups."""
    removed, total = 0, 0
    for block_name in dict.fromkeys(unit.block_name for unit in units):
        block = denoiser.get_submodule(block_name)
        heads, neurons = adapter.structured_groups(block)
        for group in heads:
            count = int(block.get_submodule(group.attention).heads)  # type: ignore[arg-type]
            if group.width % count:
                raise JobError(
                    f"{block_name}.{group.attention}: its {group.width} head channels do not "
                    f"divide into its {count} heads"
                )
            for name, offset in group.producers:
                if linear_at(block, name).out_features < offset + group.width:
                    raise JobError(
                        f"{block_name}.{name} has fewer outputs than the {group.width} head "
                        f"channels of {block_name}.{group.attention} it is read for from row "
                        f"{offset}"
                    )
            head_dim = group.width // count
            where = f"heads of {block_name}.{group.attention}"
            removed += _check_keeps_one(sparsity, count, where, head_dim, align)
            total += count
        for neuron_group in neurons:
            where = f"FFN neurons of {block_name}.{neuron_group.consumer[0]}"
            removed += _check_keeps_one(sparsity, neuron_group.width, where, 1, align)
            total += neuron_group.width
            for name, offset in neuron_group.producers:
                if linear_at(block, name).out_features < offset + neuron_group.width:
                    raise JobError(
                        f"{block_name}.{name} has fewer outputs than the {neuron_group.width} "
                        "FFN neurons its down-projection reads"
                    )
    return removed, total


def _check_keeps_one(
    sparsity: float, units: int, what: str, unit_width: int = 1, align: int | None = None
) -> int:
    try:
        removed = aligned_count(units, sparsity, unit_width, align)
    except ValueError as err:
        raise JobError(f"{what}: {err}") from None
    if removed >= units:
        raise JobError(
            f"sparsity={sparsity} would remove all {units} {what} (round({units} x {sparsity}) = "
            f"{removed}); structured pruning keeps at least one: use a sparsity below "
            f"{(units - 0.5) / units:.3f}"
        )
    return removed
