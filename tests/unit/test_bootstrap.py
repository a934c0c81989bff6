"""Bootstrap intervals over prompts: coverage at the nominal rate on a known mean, seeded,
grouped by prompt, paired differences, and FID's normal interval on resampled prompts."""

from __future__ import annotations

import numpy as np
import pytest
from cleanfid import fid as cleanfid

from obsdiff.eval.bootstrap import (
    BootstrapSettings,
    mean_interval,
    paired_difference,
    prompt_groups,
    set_statistic_interval,
)
from obsdiff.eval.fid import FIDFeatures, frechet_distance, gaussian


pytestmark = pytest.mark.unit


def test_the_interval_covers_a_known_mean_at_about_the_nominal_rate() -> None:
    """300 samples of 40 skewed values (exponential, mean 2): the 95% BCa interval contains 2
    in 88-99% of them (binomial spread of 300 draws at 0.95: about +-2.5 points)."""
    settings = BootstrapSettings(resamples=999)
    rng = np.random.default_rng(7)
    hits = 0
    for _ in range(300):
        interval = mean_interval(rng.exponential(2.0, size=40), None, settings)
        assert interval is not None
        hits += interval[0] <= 2.0 <= interval[1]
    assert 0.88 <= hits / 300 <= 0.99, hits


def test_seeded_grouped_and_degenerate() -> None:
    values = np.random.default_rng(0).normal(size=30)
    settings = BootstrapSettings(resamples=500, seed=3)
    assert mean_interval(values, None, settings) == mean_interval(values, None, settings)
    assert mean_interval(values, None, settings) != mean_interval(
        values, None, BootstrapSettings(resamples=500, seed=4)
    )
    # two images per prompt: the interval is that of the 15 prompt means
    groups = prompt_groups([f"p{i // 2}" for i in range(30)])
    assert groups.tolist() == [i // 2 for i in range(30)]
    means = values.reshape(15, 2).mean(1)
    assert mean_interval(values, groups, settings) == mean_interval(means, None, settings)
    assert mean_interval(np.full(10, 0.5), None, settings) == (0.5, 0.5)  # every prompt alike
    assert mean_interval([1.0], None, settings) is None  # one prompt: no interval
    assert mean_interval([1.0, np.inf], None, settings) is None  # identical images' PSNR
    assert mean_interval(values, None, BootstrapSettings(resamples=0)) is None
    with pytest.raises(ValueError, match="confidence"):
        BootstrapSettings(confidence=1.0)


def test_paired_differences_remove_what_both_share() -> None:
    """Two models on the same 50 prompts: the prompts' own difficulty (spread 1) is shared, the
    models differ by 0.1 +- 0.02. Unpaired intervals overlap; the paired one excludes zero."""
    rng = np.random.default_rng(1)
    difficulty = rng.normal(size=50)
    a = difficulty + 0.1 + rng.normal(scale=0.02, size=50)
    b = difficulty
    settings = BootstrapSettings(resamples=999)
    low_a, high_a = mean_interval(a, None, settings)  # type: ignore[misc]
    low_b, high_b = mean_interval(b, None, settings)  # type: ignore[misc]
    assert low_a < high_b and low_b < high_a  # overlapping
    mean, interval = paired_difference(a, b, None, settings)
    assert mean == pytest.approx(np.mean(a - b))
    assert interval is not None and 0 < interval[0] < mean < interval[1] < 0.2
    with pytest.raises(ValueError, match="shape"):
        paired_difference(a, b[:-1], None, settings)


def test_frechet_distance_equals_clean_fid_and_the_closed_form() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(400, 12)), rng.normal(size=(400, 12)) * 1.5 + 0.3
    mine = frechet_distance(*gaussian(a), *gaussian(b))
    assert mine == pytest.approx(cleanfid.frechet_distance(*gaussian(a), *gaussian(b)), rel=1e-9)
    # diagonal covariances: ||mu1 - mu2||^2 + sum (s1 - s2)^2 with s the standard deviations
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(5 + 1 + 0 + 4)


def test_fid_interval_resamples_prompts_on_both_paired_sides(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(40), 2)  # 40 prompts, two images each
    generated = rng.normal(size=(80, 4)) + groups[:, None] * 0.05
    reference = rng.normal(size=(80, 4)) + groups[:, None] * 0.05
    paired = FIDFeatures(generated, groups, reference, groups, (np.zeros(4), np.eye(4)))
    everything = np.arange(40)
    assert paired.distance(everything) == pytest.approx(
        frechet_distance(*gaussian(generated), *gaussian(reference))
    )  # the fixed statistics are not used when the reference is paired
    settings = BootstrapSettings(fid_resamples=100)
    interval = set_statistic_interval(paired.distance, 40, 100, settings)
    estimate = paired.distance(everything)
    assert interval is not None and interval[0] < estimate < interval[1]
    assert interval[1] - estimate == pytest.approx(estimate - interval[0])  # normal interval
    paired.save(tmp_path / "f.npz")
    loaded = FIDFeatures.load(tmp_path / "f.npz")
    assert np.array_equal(loaded.features, generated) and loaded.reference is not None
    alone = FIDFeatures(generated, groups, statistics=gaussian(reference))
    alone.save(tmp_path / "g.npz")
    back = FIDFeatures.load(tmp_path / "g.npz")
    assert back.reference is None and back.distance(everything) == pytest.approx(estimate)
    with pytest.raises(ValueError, match="give its statistics"):
        FIDFeatures(generated, groups).distance(everything)
    assert set_statistic_interval(lambda drawn: 0.0, 1, 100, settings) is None
