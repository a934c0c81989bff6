"""`python -m obsdiff.evaluate`: evaluate a dense model config or a pruned run directory
(conf/evaluate.yaml).

    python -m obsdiff.evaluate model=sd3_medium eval=coco2014_5k
    python -m obsdiff.evaluate pruned=outputs/prune/runs/<time> eval=coco2014_5k

The run directory receives `eval/` (images, manifest, grid, metrics) and `results.json` with
an `eval` section and, for a pruned model, a `dense` section and the prune run's results.
Failures follow `obsdiff.app.shell.execute`.
"""

from __future__ import annotations

from typing import Any

from obsdiff.app.entry import HydraApp, callable_module


APP = HydraApp("evaluate", "obsdiff.app.evaluate_app")


def main() -> Any:
    """`python -m obsdiff.evaluate`, `obsdiff-evaluate`."""
    return APP.main()


callable_module(__name__, "evaluate")  # `obsdiff.evaluate(...)` is the Python API's

if __name__ == "__main__":
    main()
