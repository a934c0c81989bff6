"""Run the apps in a subprocess, as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]


def run_app(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """`python -m <module> <args>` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=timeout,
    )
