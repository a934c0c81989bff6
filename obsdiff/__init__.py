"""obsdiff: one-shot, training-free OBS pruning of text-to-image diffusion models (OBS-Diff).

    from obsdiff.api import prune
    results = prune(pipe, method="obsdiff", sparsity=0.5, prompts=prompts)
    pipe, adapter, manifest = obsdiff.load_pruned("outputs/prune/runs/<time>")

The Python API lives in `obsdiff.api`: `obsdiff.prune` is the prune app's module
(`python -m obsdiff.prune`), so a function of that name here would be shadowed as soon as the
module is imported. `load_pruned` is imported on first use, so that `import obsdiff` stays light.
"""

from __future__ import annotations

from typing import Any


__all__ = ["load_pruned"]


def __getattr__(name: str) -> Any:
    if name == "load_pruned":
        from obsdiff.pruned import load_pruned

        return load_pruned
    raise AttributeError(f"module 'obsdiff' has no attribute {name!r}")
