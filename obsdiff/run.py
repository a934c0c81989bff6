"""`python -m obsdiff.run`: prune, then evaluate the pruned and the dense model (conf/run.yaml).

The target of sweeps: `python -m obsdiff.run -m method=obsdiff,wanda sparsity=0.3,0.5`, then
`python -m obsdiff.report <sweep dir>`. The run directory receives what `obsdiff.prune` writes,
the pruned model's images and metrics under `eval/`, and `results.json` with the prune results,
an `eval` section (pruned) and a `dense` section (the dense model, cached under
`paths.dense_cache` and shared by every run of the same model and prompt set). Failures follow
`obsdiff.app.shell.execute`: a bad setting is refused before any work, a failed job of a sweep is
recorded in its results.json and the other jobs go on.
"""

from __future__ import annotations

from typing import Any

from obsdiff.app.entry import HydraApp


APP = HydraApp("run", "obsdiff.app.run_app")


def main() -> Any:
    """`python -m obsdiff.run`, `obsdiff-run`."""
    return APP.main()


if __name__ == "__main__":
    main()
