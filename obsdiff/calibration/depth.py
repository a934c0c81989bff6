"""Depth pruning's calibration pass: every candidate block scored by its criterion on the
calibration trajectories (`obsdiff.methods.depth`), each denoiser call weighted by its step's
alpha_t, then the chosen blocks removed from the denoiser (`ModelAdapter.remove_blocks`).

One pass of the pipeline over the calibration prompts, as a package's: `block_cosine` hooks every
candidate block's input and output; `block_output_loss` calls the denoiser once more per
candidate on each call, that block skipped (its inputs passed on), and compares the predictions.
With several ranks each runs its share of the prompts and the sums are added before choosing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from obsdiff.calibration.hooks import StepTracker
from obsdiff.methods.depth import DepthCriterion, token_cosine
from obsdiff.methods.modulation import (
    LowRankModulation,
    compress_modulation,
    modulation_statistics,
)
from obsdiff.methods.package import BlockRecord, Record
from obsdiff.models.base import ModelAdapter, prediction
from obsdiff.pruning.statistics import InputStatistics
from obsdiff.runners.parallel import DataParallel
from obsdiff.utils.progress import progress
from obsdiff.utils.seeds import image_generators


if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


log = logging.getLogger(__name__)


class SkippedBlock(nn.Module):
    """A block's stand-in that passes its inputs on, in the block's output form."""

    def __init__(self, adapter: ModelAdapter) -> None:
        super().__init__()
        self.adapter = adapter

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.adapter.skipped_output(args, kwargs)


@contextmanager
def skipped(adapter: ModelAdapter, denoiser: nn.Module, name: str) -> Iterator[None]:
    """The block `name` (`<list>.<index>`) skipped while the context lasts."""
    list_name, index = name.rsplit(".", 1)
    blocks: nn.ModuleList = denoiser.get_submodule(list_name)  # type: ignore[assignment]
    block = blocks[int(index)]
    blocks[int(index)] = SkippedBlock(adapter)
    try:
        yield
    finally:
        blocks[int(index)] = block


def block_scores(
    pipe: DiffusionPipeline,
    adapter: ModelAdapter,
    criterion: DepthCriterion,
    candidates: list[str],
    step_weights: torch.Tensor,
    embeddings: list[dict[str, torch.Tensor]],
    seed: int,
    parallel: DataParallel | None = None,
    first_prompt: int = 0,
    feeds: list[tuple[nn.Linear, InputStatistics]] | None = None,
) -> dict[str, float]:
    """Each candidate block's score: the alpha_t-weighted mean over the denoiser calls of the
    calibration trajectories of what the criterion measures. `feeds`: statistics fed, in the
    same pass with the same weights, by the input of each linear (the modulation's)."""
    parallel = parallel or DataParallel()
    denoiser = adapter.denoiser(pipe)
    modules = dict(adapter.blocks(denoiser))
    totals = torch.zeros(len(candidates) + 1, dtype=torch.float64)  # the scores, then the weight
    tracker = StepTracker()
    busy = False  # inside the extra calls of block_output_loss

    def alpha() -> float:
        return float(step_weights[min(tracker.step, len(step_weights) - 1)])

    def count_call(module: nn.Module, args: tuple[Any, ...]) -> None:
        if not busy:
            totals[-1] += alpha()

    def cosine_hook(index: int) -> Any:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
        ) -> None:
            pairs = adapter.block_streams(args, kwargs, out)
            totals[index] += alpha() * sum(token_cosine(a, b) for a, b in pairs) / len(pairs)

        return hook

    def loss_hook(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        nonlocal busy
        if busy:
            return
        busy = True
        try:
            reference = prediction(out).float()
            for index, name in enumerate(candidates):
                with skipped(adapter, denoiser, name):
                    changed = prediction(denoiser(*args, **kwargs)).float()
                totals[index] += alpha() * float(torch.mean((changed - reference) ** 2))
        finally:
            busy = False

    def feed(stats: InputStatistics) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not busy:  # the dense calls only
                stats.update(args[0].detach(), alpha())

        return hook

    handles = [denoiser.register_forward_pre_hook(count_call)]
    handles += [linear.register_forward_pre_hook(feed(stats)) for linear, stats in feeds or []]
    if criterion.measures == "cosine":
        for index, name in enumerate(candidates):
            hook = cosine_hook(index)
            handles.append(modules[name].register_forward_hook(hook, with_kwargs=True))
    else:
        handles.append(denoiser.register_forward_hook(loss_hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            offset = first_prompt
            for batch in progress(embeddings, f"depth ({criterion.name})", "batch"):
                count = next(iter(batch.values())).shape[0]
                tracker.reset()
                generators = image_generators(seed, offset, count)
                adapter.calibration_call(pipe, batch, generators, tracker.on_step_end)
                offset += count
    finally:
        for handle in handles:
            handle.remove()
    parallel.all_reduce_([totals, *(t for _, stats in feeds or [] for t in stats.state_tensors())])
    weight = float(totals[-1]) or 1.0
    return {name: float(totals[index]) / weight for index, name in enumerate(candidates)}


def prune_depth(
    pipe: DiffusionPipeline,
    adapter: ModelAdapter,
    criterion: DepthCriterion,
    candidates: list[str],
    count: int,
    step_weights: torch.Tensor,
    embeddings: list[dict[str, torch.Tensor]],
    seed: int,
    parallel: DataParallel | None = None,
    first_prompt: int = 0,
    modulation: LowRankModulation | None = None,
) -> list[Record]:
    """Score the candidates, remove the `count` blocks the criterion ranks least useful from
    the denoiser, and record every block (those outside the candidates with no score). With
    `modulation`, the modulation linears' statistics are gathered in the same pass and the
    linears that remain factorised (`obsdiff.methods.modulation`)."""
    denoiser = adapter.denoiser(pipe)
    names = [name for name, _ in adapter.blocks(denoiser)]
    feeds = []
    if modulation is not None:
        feeds = modulation_statistics(denoiser, adapter.modulation_linears(denoiser))
    scores = block_scores(
        pipe, adapter, criterion, candidates, step_weights, embeddings, seed, parallel,
        first_prompt, feeds,
    )  # fmt: skip
    gone = criterion.chosen(scores, count)
    adapter.remove_blocks(denoiser, gone)
    records: list[Record] = [BlockRecord(name, scores.get(name), name in gone) for name in names]
    if modulation is not None:  # the linears of the blocks that stay, under their new names
        by_linear = {id(linear): stats for linear, stats in feeds}
        kept = adapter.modulation_linears(denoiser)
        statistics = [by_linear[id(denoiser.get_submodule(name))] for name in kept]
        records += compress_modulation(denoiser, kept, statistics, modulation)
    log.info(
        "depth (%s): removed %s of %d candidate blocks", criterion.name, ", ".join(gone) or "none",
        len(candidates),
    )  # fmt: skip
    return records
