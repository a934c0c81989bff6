"""Progress bars: one per loop that means something to a person, none when not on a terminal.

`progress` is tqdm with `disable=None`: a bar when stderr is a terminal, nothing when the output
goes to a file, a pipe or CI (the apps log one line per package or phase instead). The
pipelines' own per-call step bars are switched off wherever obsdiff calls a pipeline in a loop.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm


T = TypeVar("T")


def progress(
    iterable: Iterable[T], desc: str, unit: str, leave: bool = True, enabled: bool = True
) -> Iterator[T]:
    """`iterable` with a bar on a terminal (`enabled=False`: never a bar)."""
    return iter(
        tqdm(iterable, desc=desc, unit=unit, leave=leave, disable=None if enabled else True)
    )


def quiet_library_bars() -> None:
    """No loading bars from diffusers and transformers when stderr is not a terminal."""
    if sys.stderr.isatty():
        return
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
