"""Where a long loop or phase stands: a bar on a terminal, a log line every 30 s elsewhere.

`progress` is tqdm with `disable=None`: a bar when stderr is a terminal. When the output goes to a
file, a pipe or CI there is no bar (it would flood the log); a heartbeat logs one line at least
every `HEARTBEAT_SECONDS` instead (`<desc>: <unit> <done>/<total> done, <elapsed> s`), so a long
calibration, generation, scoring or solve is never silent. `heartbeat` does the same for a phase
that is not a loop. The pipelines' own per-call step bars are switched off wherever obsdiff calls
a pipeline in a loop.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager
from typing import TypeVar

from tqdm.auto import tqdm


log = logging.getLogger(__name__)

T = TypeVar("T")
HEARTBEAT_SECONDS = 30.0  # off a terminal: a progress line at least this often


def on_terminal() -> bool:
    return sys.stderr.isatty()


@contextmanager
def heartbeat(desc: str, status: Callable[[], str] | None = None) -> Iterator[None]:
    """Off a terminal, a log line every `HEARTBEAT_SECONDS` while the block runs:
    `<desc>: <status()>, <elapsed> s` (nothing on a terminal, where bars show it)."""
    if on_terminal():
        yield
        return
    started = time.monotonic()
    done = threading.Event()

    def beat() -> None:
        while not done.wait(HEARTBEAT_SECONDS):
            where = f"{status()}, " if status is not None else ""
            log.info("%s: %s%.0f s", desc, where, time.monotonic() - started)

    thread = threading.Thread(target=beat, name=f"heartbeat: {desc}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def progress(
    iterable: Iterable[T], desc: str, unit: str, leave: bool = True, enabled: bool = True
) -> Iterator[T]:
    """`iterable` with a bar on a terminal (`enabled=False`: never a bar), a heartbeat line
    every `HEARTBEAT_SECONDS` elsewhere."""
    if on_terminal():
        yield from tqdm(iterable, desc=desc, unit=unit, leave=leave, disable=not enabled)
        return
    total = f"/{len(iterable)}" if isinstance(iterable, Sized) else ""
    count = 0
    with heartbeat(desc, lambda: f"{unit} {count}{total} done"):
        for item in iterable:
            yield item
            count += 1


def quiet_library_bars() -> None:
    """No loading bars from diffusers and transformers when stderr is not a terminal."""
    if on_terminal():
        return
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
