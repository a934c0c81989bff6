"""Entry-point modules that are also the public functions of the same name.

`obsdiff.prune` is both the prune app (`python -m obsdiff.prune`, `obsdiff-prune`) and the
Python function `obsdiff.prune(pipe, ...)`. Importing a submodule sets it as the package's
attribute of that name, which would shadow the function; so each such module is made callable,
calling the function: `obsdiff.prune(pipe, ...)` works whatever was imported before.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any


class CallableModule(types.ModuleType):
    """A module whose call is its public function's."""

    __function__: Callable[..., Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__function__(*args, **kwargs)


def callable_module(name: str, function: Callable[..., Any]) -> None:
    """Make module `name` (an entry point's `__name__`) call `function` when called."""
    module = sys.modules[name]
    module.__function__ = function  # type: ignore[attr-defined]
    module.__class__ = CallableModule
