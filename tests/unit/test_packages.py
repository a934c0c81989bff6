"""Module packages: contiguous, deterministic, every module once, no basic unit split."""

from __future__ import annotations

import pytest

from obsdiff.calibration.packages import UnitRef, split_packages


pytestmark = pytest.mark.unit


def units(count: int) -> list[UnitRef]:
    return [
        UnitRef(i // 4, f"blocks.{i // 4}", ((f"u{i}.a", f"u{i}.b"), (f"u{i}.c",)))
        for i in range(count)
    ]


@pytest.mark.parametrize(("count", "packages"), [(96, 4), (10, 3), (7, 7), (5, 1), (9, 2)])
def test_split_rule(count: int, packages: int) -> None:
    listed = units(count)
    split = split_packages(listed, packages)
    assert len(split) == packages
    assert [u for p in split for u in p] == listed  # contiguous, in order, each once
    sizes = [len(p) for p in split]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert split == split_packages(listed, packages)


def test_sd3_medium_shape_of_the_paper() -> None:
    """24 blocks, the last context_pre_only: 23 x 4 + 4 = 96 units, 24 per package at K = 4."""
    assert [len(p) for p in split_packages(units(96), 4)] == [24] * 4


def test_bad_package_counts() -> None:
    with pytest.raises(ValueError, match=r"packages=0 must lie in \[1, 5\]"):
        split_packages(units(5), 0)
    with pytest.raises(ValueError, match="packages=6"):
        split_packages(units(5), 6)
