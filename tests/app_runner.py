"""Run the apps in a subprocess, as a user would."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import subprocess
import sys
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
# A prune of the tiny SD3 in seconds: the command-line settings the app tests share.
TINY_PRUNE = [
    "model=tiny_sd3",
    "calibration=tiny",
    "model.sampling.num_inference_steps=2",
    "calibration.num_prompts=2",
    "packages=2",
]


def run_app(
    module: str, *args: str, timeout: int = 600, env: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m <module> <args>` from the repository root, output captured; `env` adds to
    (a value) or removes from (None) the test environment."""
    return _run([sys.executable, "-m", module, *args], timeout, env)


def run_python(
    prelude: str,
    module: str,
    *args: str,
    timeout: int = 600,
    env: dict[str, str | None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """As `run_app`, after running the Python code `prelude` in the same process (to inject a
    failure or an interruption at a chosen point, as a user's Ctrl-C would)."""
    launch = (
        "import runpy, sys\n"
        f"sys.argv = [{module!r}, *{list(args)!r}]\n"
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
    )
    return _run([sys.executable, "-c", prelude + "\n" + launch], timeout, env)


def _run(
    command: list[str], timeout: int, env: dict[str, str | None] | None
) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            environment.pop(key, None)
        else:
            environment[key] = value
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=timeout,
        env=environment,
    )


def run_in_process(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m <module> <args>` inside this process (no interpreter to start, no imports to
    repeat): for an app whose own process is not the point (a refused setting, a command
    taken from a model card, a resume). The app's console output is captured; Hydra's global
    state and the logging setup it installs are put back afterwards."""
    from hydra.core.global_hydra import GlobalHydra

    entry = importlib.import_module(module)
    output = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    argv = sys.argv
    sys.argv = [module, *args]
    code: int | str | None = 0
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            entry.main()
    except SystemExit as stop:
        code = stop.code
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
        root.handlers[:] = handlers
        root.setLevel(level)
    returncode = code if isinstance(code, int) else (0 if code is None else 1)
    return subprocess.CompletedProcess([module, *args], returncode, output.getvalue(), "")
