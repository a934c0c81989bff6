"""`python -m obsdiff.prune`: prune a diffusion model with OBS-Diff or a baseline (conf/prune.yaml).

Every setting is validated before the model is loaded (`obsdiff.app.shell.execute`); the run
directory receives the pruned denoiser (safetensors), `manifest.json`, `results.json` and
`config.yaml`.
"""

from __future__ import annotations

from typing import Any

from obsdiff.app.entry import HydraApp, callable_module


APP = HydraApp("prune", "obsdiff.app.prune_app")


def main() -> Any:
    """`python -m obsdiff.prune`, `obsdiff-prune`."""
    return APP.main()


callable_module(__name__, "prune")  # `obsdiff.prune(...)` is the Python API's

if __name__ == "__main__":
    main()
