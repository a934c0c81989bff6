"""Bootstrap confidence intervals for evaluation figures, with `scipy.stats.bootstrap`.

The unit of resampling is the prompt: the images of one prompt (several seeds, or the repeated
prompts of the toy set) are drawn together, since they are not independent. A per-image metric
gets the BCa interval of its mean (the mean of per-prompt means is resampled); a paired
comparison of two models on the same prompts and seeds gets the interval of the mean of the
per-image differences; FID, a statistic of the whole image set, gets a normal interval from the
spread of its recomputation on resampled sets of prompts (features computed once; a reference
made of images of the same prompts, the dense model's or the toy dataset's, is resampled with
them: `obsdiff.eval.fid.FIDFeatures`). Every interval is seeded: a rerun gives the same numbers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class BootstrapSettings:
    """eval.bootstrap: the intervals over prompts (scipy.stats.bootstrap), seeded.

    Attributes:
        resamples: For means and paired differences (BCa); 0: no intervals.
        fid_resamples: FID is recomputed per resample (a matrix square root each); 0: no FID
            interval.
        confidence: The intervals' confidence level.
        seed: The resampling's seed: a rerun gives the same intervals.
    """

    resamples: int = field(default=2000, metadata={"minimum": 0})
    fid_resamples: int = field(default=200, metadata={"minimum": 0})
    confidence: float = 0.95
    seed: int = field(default=0, metadata={"minimum": 0})

    def __post_init__(self) -> None:
        if self.resamples < 0 or self.fid_resamples < 0:
            raise ValueError("eval.bootstrap.resamples and fid_resamples must be >= 0 (0: off)")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"eval.bootstrap.confidence={self.confidence} must lie in (0, 1)")


def prompt_groups(prompts: Sequence[str]) -> np.ndarray:
    """Group index of each image: images of the same prompt text share one. (images,)"""
    index: dict[str, int] = {}
    return np.array([index.setdefault(p, len(index)) for p in prompts], dtype=np.int64)


def _group_means(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Mean of `values` within each group. (groups,)"""
    counts = np.bincount(groups)
    return np.bincount(groups, weights=values) / counts


def mean_interval(
    values: Sequence[float] | np.ndarray,
    groups: np.ndarray | None,
    settings: BootstrapSettings,
) -> tuple[float, float] | None:
    """BCa interval of the mean of per-image `values`, resampling prompts (`groups`; None: each
    image its own). None when it cannot be computed (fewer than two prompts, a non-finite value,
    resampling off); a zero-width interval when every prompt has the same mean."""
    data = np.asarray(values, dtype=np.float64)
    if settings.resamples == 0 or data.size == 0 or not np.isfinite(data).all():
        return None
    means = data if groups is None else _group_means(data, groups)
    if means.size < 2:
        return None
    if np.ptp(means) == 0:
        return float(means[0]), float(means[0])
    from scipy import stats  # here: the settings above are read before scipy need load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap(
            (means,),
            np.mean,
            n_resamples=settings.resamples,
            confidence_level=settings.confidence,
            method="BCa",
            vectorized=True,
            rng=np.random.default_rng(settings.seed),
        )
    low, high = result.confidence_interval
    if not (np.isfinite(low) and np.isfinite(high)):  # BCa failed: degenerate resamples
        return None
    return float(low), float(high)


def paired_difference(
    values: Sequence[float] | np.ndarray,
    reference: Sequence[float] | np.ndarray,
    groups: np.ndarray | None,
    settings: BootstrapSettings,
) -> tuple[float, tuple[float, float] | None]:
    """Mean of `values - reference` (the same prompts and seeds, image for image) and its BCa
    interval, resampling prompts."""
    a, b = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in shape: {a.shape} vs {b.shape}")
    difference = a - b
    return float(difference.mean()), mean_interval(difference, groups, settings)


def set_statistic_interval(
    statistic: Callable[[np.ndarray], float],
    n_groups: int,
    resamples: int,
    settings: BootstrapSettings,
) -> tuple[float, float] | None:
    """Normal bootstrap interval of a statistic of a whole image set (FID, a difference of
    FIDs): the estimate on every prompt plus or minus z times the standard deviation of
    `statistic(drawn)` over `resamples` draws of `n_groups` prompts with replacement (`drawn`:
    the group ids drawn, duplicates included).

    Not the percentile interval: FID is biased upward on small sets, and a resample's
    duplicates shrink the set, so the resampled FIDs sit above the estimate (on the toy, the
    2.5% quantile was above the estimate itself); their spread still measures its error."""
    if resamples == 0 or n_groups < 2:
        return None
    from scipy import stats

    result = stats.bootstrap(
        (np.arange(n_groups),),
        lambda drawn: statistic(np.asarray(drawn, dtype=np.int64)),
        n_resamples=resamples,
        confidence_level=settings.confidence,
        method="percentile",
        vectorized=False,
        rng=np.random.default_rng(settings.seed),
    )
    estimate = statistic(np.arange(n_groups))
    half = stats.norm.ppf(0.5 + settings.confidence / 2) * float(result.standard_error)
    return float(estimate - half), float(estimate + half)
