"""Off a terminal a long loop or phase logs where it stands at least every HEARTBEAT_SECONDS;
on a terminal a bar shows it and nothing is logged."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from obsdiff.utils import progress as progress_module
from obsdiff.utils.progress import heartbeat, progress


pytestmark = pytest.mark.unit


def slow(count: int, seconds: float) -> Iterator[int]:
    for item in range(count):
        time.sleep(seconds)
        yield item


@pytest.fixture
def quick_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module, "HEARTBEAT_SECONDS", 0.02)
    monkeypatch.setattr(progress_module, "on_terminal", lambda: False)


def test_a_loop_off_a_terminal_logs_how_far_it_is(
    quick_heartbeat: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=progress_module.__name__)
    done = [time.sleep(s) for s in progress([0.06, 0.06, 0.06], "package 1/4", "batch")]
    assert len(done) == 3
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) >= 2, lines  # 0.18 s at a line every 0.02 s: about 8
    assert all(line.startswith("package 1/4: batch ") and "/3 done, " in line for line in lines)
    assert any(line.startswith("package 1/4: batch 2/3 done") for line in lines)
    time.sleep(0.1)  # the heartbeat stopped with the loop
    assert len(caplog.records) == len(lines)


def test_a_phase_off_a_terminal_logs_while_it_runs(
    quick_heartbeat: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=progress_module.__name__)
    with heartbeat("toy on toy: scoring"):
        time.sleep(0.1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) >= 2 and all(line.startswith("toy on toy: scoring: ") for line in lines)
    assert lines[-1].endswith(" s")


def test_on_a_terminal_a_bar_and_no_log_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(progress_module, "HEARTBEAT_SECONDS", 0.01)
    monkeypatch.setattr(progress_module, "on_terminal", lambda: True)
    caplog.set_level(logging.INFO, logger=progress_module.__name__)
    assert list(progress(slow(3, 0.02), "calibration", "batch")) == [0, 1, 2]
    with heartbeat("scoring"):
        time.sleep(0.03)
    assert not caplog.records
