"""`python -m obsdiff.recover`: distil a pruned run back towards its dense model, data-free
(conf/recover.yaml).

    python -m obsdiff.recover pruned=outputs/prune/runs/<time>
    python -m obsdiff.recover pruned=outputs/prune/runs/<time> recover.steps=500 recover.lr=1e-5

The run directory receives the recovered denoiser (safetensors), its manifest (the pruned run's,
with the recovery's settings) and `results.json` with a `recover` section (steps, seconds, the
first and last loss, peak memory); `load_pruned`, `obsdiff.evaluate` and `obsdiff.export` read
it as a prune run. Failures follow `obsdiff.app.shell.execute`.
"""

from __future__ import annotations

from typing import Any

from obsdiff.app.entry import HydraApp, callable_module


APP = HydraApp("recover", "obsdiff.app.recover_app")


def main() -> Any:
    """`python -m obsdiff.recover`, `obsdiff-recover`."""
    return APP.main()


callable_module(__name__, "recover")  # `obsdiff.recover(...)` is the Python API's

if __name__ == "__main__":
    main()
