"""Run the apps in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]


def run_app(
    module: str, *args: str, timeout: int = 300, env: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m <module> <args>` from the repository root, output captured; `env` adds to
    (a value) or removes from (None) the test environment."""
    environment = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            environment.pop(key, None)
        else:
            environment[key] = value
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=timeout,
        env=environment,
    )
