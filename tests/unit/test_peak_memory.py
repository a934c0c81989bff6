"""A job's peak memory counts from its own start: the jobs of a sweep share one process."""

from __future__ import annotations

import mmap

import pytest
import torch

from obsdiff.utils.memory import PROC_CLEAR_REFS, peak_memory_bytes, reset_peak_memory


pytestmark = pytest.mark.unit


@pytest.mark.skipif(not PROC_CLEAR_REFS.exists(), reason="Linux's peak-RSS counter only")
def test_the_peak_resets_between_jobs() -> None:
    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    # 64 MiB mapped and touched, unmapped on close: what malloc's arenas hold after earlier
    # tests (freed memory it keeps, reused without growing the resident set) plays no part
    big = mmap.mmap(-1, 64 * 2**20)
    big.write(b"\1" * len(big))
    during = peak_memory_bytes(cpu)
    big.close()
    reset_peak_memory(cpu)
    after = peak_memory_bytes(cpu)
    assert during - after > 48 * 2**20  # the next job does not inherit the first one's peak
