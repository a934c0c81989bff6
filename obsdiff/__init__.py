"""obsdiff: one-shot, training-free OBS pruning of text-to-image diffusion models (OBS-Diff).

    import obsdiff
    pruned = obsdiff.prune(pipe, method="obsdiff", sparsity=0.5, prompts=prompts)
    recovered = obsdiff.recover(pruned, prompts, steps=100)  # distilled towards the dense
    quantized = obsdiff.quantize("my_run", "int8_weight_only")  # torchao, on top
    obsdiff.save_pruned(recovered, "my_run")
    pruned = obsdiff.load_pruned("my_run")
    scores = obsdiff.evaluate(pruned, prompts=eval_prompts, out_dir="my_eval")
    obsdiff.export("my_run", "exported")   # a diffusers folder with a model card

The functions live in `obsdiff.api` and are imported on first use, so that `import obsdiff`
stays light. `obsdiff.prune`, `obsdiff.evaluate` and `obsdiff.export` are also the apps' modules
(`python -m obsdiff.prune`); once such a module is imported it stands in the package under the
function's name, and calling it calls the function (`obsdiff.app.entry.callable_module`).
"""

from __future__ import annotations

from typing import Any


__all__ = [
    "evaluate",
    "export",
    "load_pruned",
    "memory_plan",
    "prune",
    "quantize",
    "recover",
    "recovery_memory_plan",
    "save_pruned",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from obsdiff import api

        return getattr(api, name)
    raise AttributeError(f"module 'obsdiff' has no attribute {name!r}")
