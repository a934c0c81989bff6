"""The Python API: prune a diffusers pipeline already in memory, as the prune app does.

    from obsdiff.api import prune
    results = prune(pipe, method="obsdiff", granularity="unstructured", sparsity=0.5,
                    prompts=prompts, packages=4, weighting="log_decrease")

The pipeline's family is recognised from its class; methods, granularities and weighting
schemes go by the names of their config options (or are given as the objects the configs
build), with the options' defaults. The pipeline is pruned in place (its weights are first
copied into memory of their own, `obsdiff.utils.memory`, so the results are the same on any
CPU) and `prune_pipeline`, the function the prune app runs, does the work.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline

from obsdiff.calibration.prompts import PromptSet, prompts_record
from obsdiff.calibration.sequential import CalibrationSettings
from obsdiff.methods import L1, DSnoT, Granularity, Magnitude, ObsDiff, PruningMethod, Wanda
from obsdiff.methods.dense import Dense
from obsdiff.models import adapter_for
from obsdiff.models.base import SamplingDefaults
from obsdiff.pruning.schedules import TimestepWeighting
from obsdiff.utils.devices import resolve_device
from obsdiff.workflow import PruneJob, check_layout, prune_pipeline


METHODS: dict[str, type[PruningMethod]] = {
    cls.name: cls for cls in (ObsDiff, Wanda, DSnoT, Magnitude, L1, Dense)
}
# as conf/granularity/*.yaml
GRANULARITIES = {
    "unstructured": Granularity("unstructured", "unstructured"),
    "semi_2_4": Granularity("semi_2_4", "nm", 2, 4),
    "semi_4_8": Granularity("semi_4_8", "nm", 4, 8),
    "structured": Granularity("structured", "structured"),
}


def prune(
    pipe: DiffusionPipeline,
    method: str | PruningMethod = "obsdiff",
    granularity: str | Granularity = "unstructured",
    sparsity: float = 0.5,
    *,
    prompts: list[str],
    packages: int = 4,
    weighting: str | TimestepWeighting = "log_decrease",
    sampling: dict[str, Any] | SamplingDefaults | None = None,
    batch_size: int = 4,
    seed: int = 0,
    include_uncond: bool = True,
    hessian_precision: str = "float32",
    blocks: tuple[int, int] | None = None,
    device: str = "auto",
    run_dir: str | Path | None = None,
    **method_options: Any,
) -> dict[str, Any]:
    """Prune `pipe` in place; returns the results the prune app records (achieved sparsity,
    parameters, TFLOPs, seconds). `method_options` set the method's parameters (e.g.
    `compensate=False`); `run_dir` also writes the pruned denoiser and its manifest there, as
    the app does (and keeps a resumable checkpoint while it works). Every setting is checked
    before the first calibration pass."""
    if not prompts:
        raise ValueError("prompts is empty: give the calibration prompts (a list of strings)")
    adapter = adapter_for(pipe, sampling)
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"method={method!r}; use one of {', '.join(METHODS)}")
        method = METHODS[method](**method_options)  # type: ignore[call-arg]
    if isinstance(granularity, str):
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity={granularity!r}; use one of {', '.join(GRANULARITIES)}")
        granularity = GRANULARITIES[granularity]
    if isinstance(weighting, str):
        weighting = TimestepWeighting(weighting)
    record = prompts_record(list(prompts), "python", "")
    settings = {
        "method": method.describe(),
        "granularity": granularity.name,
        "sparsity": sparsity,
        "weighting": weighting.describe(adapter.sampling.num_inference_steps),
        "packages": packages,
        "prompts_sha256": record["prompts_sha256"],
        "calibration": [batch_size, seed, include_uncond, hessian_precision],
        "blocks": blocks,
        "sampling": adapter.describe()["sampling"],
    }
    job = PruneJob(
        model=adapter,
        model_config=adapter.describe(),
        method=method,
        granularity=granularity,
        sparsity=sparsity,
        weighting=weighting,
        packages=packages,
        prompts=PromptSet(list(prompts), "python", "", "given", None),
        calibration=CalibrationSettings(batch_size, seed, include_uncond, hessian_precision),
        device=resolve_device(device),
        config=settings,
        blocks=blocks,
        save=run_dir is not None,
    )
    check_layout(job)
    if run_dir is not None:
        return prune_pipeline(job, Path(run_dir))[1]
    with tempfile.TemporaryDirectory(prefix="obsdiff-") as scratch:  # its checkpoint, then gone
        return prune_pipeline(job, Path(scratch))[1]
