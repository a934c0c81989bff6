"""The entry points' machinery: the command line checked before the app's heavy imports, and
entry-point modules that are also the public functions of the same name.

`python -m obsdiff.prune` and `obsdiff-prune` call `HydraApp("prune", ...).main()`: the command
line is checked first (`obsdiff.app.preflight`, in seconds: a bad setting never waits for
diffusers to import), then the app's task module is imported and run under `hydra.main`.

`obsdiff.prune` is both the prune app and the Python function `obsdiff.prune(pipe, ...)`.
Importing a submodule sets it as the package's attribute of that name, which would shadow the
function; so each such module is made callable, calling the function (`obsdiff.api.<name>`,
imported on the first call): `obsdiff.prune(pipe, ...)` works whatever was imported before.
"""

from __future__ import annotations

import importlib
import sys
import types
from dataclasses import dataclass
from typing import Any

import hydra

from obsdiff.app.preflight import check_command_line


@dataclass(frozen=True)
class HydraApp:
    """A Hydra app: its config (`conf/<config_name>.yaml`) and its task function (the module
    path `obsdiff.app.<name>_app` and the function's name in it)."""

    config_name: str
    task_module: str
    task: str = "task"

    def main(self) -> Any:
        """Check the command line, then run the app as Hydra runs it."""
        from obsdiff.app.config import CONF_DIR

        check_command_line(self.config_name, sys.argv[1:])
        task = getattr(importlib.import_module(self.task_module), self.task)
        run = hydra.main(
            config_path=str(CONF_DIR), config_name=self.config_name, version_base="1.3"
        )
        return run(task)()


class CallableModule(types.ModuleType):
    """A module whose call is its public function's (`obsdiff.api.<__function_name__>`)."""

    __function_name__: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from obsdiff import api

        return getattr(api, self.__function_name__)(*args, **kwargs)


def callable_module(name: str, function_name: str) -> None:
    """Make module `name` (an entry point's `__name__`) call `obsdiff.api.<function_name>`."""
    module = sys.modules[name]
    module.__function_name__ = function_name  # type: ignore[attr-defined]
    module.__class__ = CallableModule
