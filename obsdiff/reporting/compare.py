"""Paired comparisons between the jobs of a sweep: the same prompts and seeds, image for image.

Within a cell (one model, granularity and sparsity), every completed job is compared with a
reference job: the mean of its per-image differences (`per_image.csv` of both evaluations,
joined on the image id) with a bootstrap interval over prompts, and for FID the difference of
the two FIDs recomputed on the same resampled prompts (`fid_features.npz`). The best job of a
cell is only called best (bold in the report) where its difference from the runner-up has an
interval that excludes zero.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from obsdiff.eval.bootstrap import (
    BootstrapSettings,
    paired_difference,
    prompt_groups,
    set_statistic_interval,
)
from obsdiff.eval.fid import FIDFeatures
from obsdiff.reporting.collect import DENSE, HIGHER_IS_BETTER, JobResult


log = logging.getLogger(__name__)

HEADLINE = ("image_reward", "prompt_fidelity", "clip_score", "fid", "lpips", "psnr")
FID = "fid"
BASELINE_OF = "obsdiff"  # the method whose comparisons are against the best other method


@dataclass
class Difference:
    """`job` minus `reference` in one metric, on the images both have."""

    job: JobResult
    reference: JobResult
    metric: str
    mean: float
    interval: tuple[float, float] | None
    images: int

    @property
    def significant(self) -> bool:
        return self.interval is not None and (self.interval[0] > 0 or self.interval[1] < 0)


@dataclass
class PairedScores:
    """Reads and keeps the per-image scores and FID features of the jobs it is asked about,
    and the differences it computed (the tables ask for some twice)."""

    settings: BootstrapSettings = field(default_factory=BootstrapSettings)
    _tables: dict[Path, pd.DataFrame | None] = field(default_factory=dict)
    _features: dict[Path, FIDFeatures | None] = field(default_factory=dict)
    _differences: dict[tuple[Path, str, Path, str, str], Difference | None] = field(
        default_factory=dict
    )

    def table(self, job: JobResult) -> pd.DataFrame | None:
        path = job.per_image
        if path is None:
            return None
        if path not in self._tables:
            self._tables[path] = pd.read_csv(path) if path.is_file() else None
            if self._tables[path] is None:
                log.warning("job %s: its per-image scores %s are missing", job.job, path)
        return self._tables[path]

    def features(self, job: JobResult) -> FIDFeatures | None:
        path = job.fid_features
        if path is None:
            return None
        if path not in self._features:
            self._features[path] = FIDFeatures.load(path) if path.is_file() else None
        return self._features[path]

    def difference(self, job: JobResult, reference: JobResult, metric: str) -> Difference | None:
        """`job - reference` in `metric`, paired image by image; None where either lacks the
        per-image data or they share no image."""
        key = (job.path, job.job, reference.path, reference.job, metric)
        if key not in self._differences:
            self._differences[key] = self._difference(job, reference, metric)
        return self._differences[key]

    def _difference(self, job: JobResult, reference: JobResult, metric: str) -> Difference | None:
        if metric == FID:
            return self._fid_difference(job, reference)
        mine, theirs = self.table(job), self.table(reference)
        if mine is None or theirs is None or metric not in mine or metric not in theirs:
            return None
        both = mine[["id", "prompt", metric]].merge(
            theirs[["id", "prompt", metric]], on=["id", "prompt"], suffixes=("", "_ref")
        )
        if both.empty:
            return None
        groups = prompt_groups(both["prompt"].tolist())
        mean, interval = paired_difference(
            both[metric].to_numpy(), both[f"{metric}_ref"].to_numpy(), groups, self.settings
        )
        return Difference(job, reference, metric, mean, interval, len(both))

    def _fid_difference(self, job: JobResult, reference: JobResult) -> Difference | None:
        mine, theirs = self.features(job), self.features(reference)
        if mine is None or theirs is None or not np.array_equal(mine.groups, theirs.groups):
            return None  # other prompts (or none): no paired resampling
        n_groups = int(mine.groups.max()) + 1
        everything = np.arange(n_groups)
        mean = mine.distance(everything) - theirs.distance(everything)
        interval = set_statistic_interval(
            lambda drawn: mine.distance(drawn) - theirs.distance(drawn),
            n_groups,
            self.settings.fid_resamples,
            self.settings,
        )
        return Difference(job, reference, FID, mean, interval, len(mine.groups))


def evaluation_key(job: JobResult) -> tuple[tuple[str, str], ...]:
    """The job's evaluation settings (`eval.*` overrides): jobs with other ones generated other
    images, which are not paired."""
    return tuple(sorted((k, str(v)) for k, v in job.settings.items() if k.startswith("eval.")))


def cells(jobs: Sequence[JobResult]) -> dict[tuple[object, ...], list[JobResult]]:
    """The completed pruned jobs that compete: the same sparsity and the same evaluation
    settings (`eval.*`: other images are not paired), whatever else differs (method,
    weighting, packages, ...)."""
    found: dict[tuple[object, ...], list[JobResult]] = {}
    for job in jobs:
        if job.completed and job.method != DENSE:
            found.setdefault((job.sparsity, *evaluation_key(job)), []).append(job)
    return found


def ranked(members: Sequence[JobResult], metric: str) -> list[JobResult]:
    """The members that have `metric`, best first."""
    have = [j for j in members if metric in j.metrics]
    sign = -1.0 if HIGHER_IS_BETTER[metric] else 1.0
    return sorted(have, key=lambda j: sign * j.metrics[metric])


def headline(jobs: Sequence[JobResult]) -> str | None:
    """The metric that picks the default reference: the first of HEADLINE any job has."""
    present = {k for j in jobs for k in j.metrics}
    return next((m for m in HEADLINE if m in present), None)


def matches(job: JobResult, selector: dict[str, str]) -> bool:
    return all(str(job.settings.get(k)) == v for k, v in selector.items())


def choose_reference(
    members: Sequence[JobResult], metric: str | None, selector: dict[str, str] | None = None
) -> JobResult | None:
    """The reference of a cell: the job `selector` names (e.g. method=wanda), else the best
    baseline (the best job whose method is not OBS-Diff) by `metric`, else the best job."""
    if selector:
        return next((j for j in members if matches(j, selector)), None)
    if metric is None:
        return None
    order = ranked(members, metric)
    baselines = [j for j in order if j.method != BASELINE_OF]
    candidates = baselines or order
    return candidates[0] if candidates else None


def tested_best(
    members: Sequence[JobResult], metric: str, scores: PairedScores
) -> tuple[JobResult | None, Difference | None]:
    """The best job of a cell in `metric` and its paired difference from the runner-up; the
    job is None when there is no runner-up or the difference cannot be computed."""
    order = ranked(members, metric)
    if len(order) < 2:
        return None, None
    difference = scores.difference(order[0], order[1], metric)
    return (order[0] if difference is not None else None), difference
