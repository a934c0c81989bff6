"""The sequential calibrate-and-prune loop over module packages (paper Sec. 4.2).

For each package: attach hooks feeding one `InputStatistics` per input group, run every
calibration batch through the real pipeline (prompt embeddings computed once, reused by every
package), remove the hooks, prune the package, free its statistics, go on. Later packages see the
already pruned earlier ones. Methods that need no statistics (magnitude, dense) skip the passes.

`Placement` says where the work lives without changing its result: statistics offloaded to CPU
memory (one work unit's moved to the device for its solve), the pipeline's other components
(text encoders, VAE) off the device while the denoiser calibrates and is solved, and, with
several ranks, the solve shared between them (`obsdiff.calibration.solve`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from obsdiff.calibration.cache import StatisticsCache
from obsdiff.calibration.hooks import StatisticsHooks, StepTracker
from obsdiff.calibration.importance import empty_conditioning, importance_maps
from obsdiff.calibration.packages import UnitRef
from obsdiff.calibration.solve import solve_package
from obsdiff.calibration.token_maps import ImportanceMaps
from obsdiff.methods.base import PruningMethod
from obsdiff.methods.modulation import (
    LowRankModulation,
    compress_modulation,
    modulation_statistics,
)
from obsdiff.methods.obs_diff import CFG_RESPONSE, NO_TOKEN_WEIGHTING
from obsdiff.methods.package import (
    InputGroup,
    Package,
    Record,
    Structured,
    StructuredBlock,
    Target,
    UnitGroup,
)
from obsdiff.models.base import ModelAdapter
from obsdiff.models.experts import expert_of
from obsdiff.models.sampling import CFG_NONE
from obsdiff.models.structure import linear_at
from obsdiff.pruning.statistics import InputStatistics
from obsdiff.runners.parallel import DataParallel
from obsdiff.utils.progress import progress
from obsdiff.utils.seeds import image_generators


if TYPE_CHECKING:  # diffusers is imported where a pipeline is loaded: the settings stay light
    from diffusers import DiffusionPipeline


log = logging.getLogger(__name__)


@dataclass
class CalibrationSettings:
    """The calibration set and how its passes run: the `calibration` config group's keys and the
    defaults of `obsdiff.prune`'s calibration arguments.

    Attributes:
        prompts: A prompt file (GCC3M TSV, text, CSV, JSONL, COCO JSON), or `bundled`:
            obsdiff's demo prompts.
        format: auto, tsv, txt, csv, jsonl or coco.
        column: The CSV or JSONL column, the TSV header name.
        num_prompts: How many prompts of the file; null: all.
        selection: `first` (the reference code) or `random` (a sample seeded by `seed`).
        seed: Calibration noise: image i of the prompt list uses seed + i.
        batch_size: Prompts per calibration pipeline call.
        include_uncond: Feed the CFG unconditional half to the statistics (the reference code).
        hessian_precision: Of the X^T X products: float32, tf32 or bfloat16 (GPU speed; the sums
            stay float32).
        max_tokens: Tokens a hook feeds to the statistics per denoiser call at most: above it, a
            seeded sample of token positions (the same for each sample of the call), its sums
            scaled to the call's full token count (an unbiased estimate of them). Null: every
            token (a video model's call holds tens of thousands).
    """

    prompts: str = "bundled"
    format: str = "auto"
    column: str = "caption"
    num_prompts: int | None = field(default=None, metadata={"example": 100, "minimum": 1})
    selection: str = "first"
    seed: int = 0
    batch_size: int = field(default=4, metadata={"minimum": 1})
    include_uncond: bool = True
    hessian_precision: str = "float32"
    max_tokens: int | None = field(default=None, metadata={"example": 4096, "minimum": 1})

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(
                f"calibration.max_tokens={self.max_tokens} must be >= 1; set a positive cap "
                "(e.g. 4096) or null for every token"
            )

    def run_settings(self) -> dict[str, Any]:
        """What changes the statistics besides the prompts themselves (their sha256 says which
        they are): part of a run's key and of the statistics cache's."""
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "include_uncond": self.include_uncond,
            "hessian_precision": self.hessian_precision,
            **({"max_tokens": self.max_tokens} if self.max_tokens is not None else {}),
        }


@dataclass(frozen=True)
class Offload:
    """Where the work lives while pruning (the prune app's `offload.*`); the pruned weights are
    the same whatever it says.

    Attributes:
        statistics: Package statistics in CPU memory (pinned beside CUDA), one work unit's moved
            to the device for its solve.
        components: Every component but the denoiser (text encoders, VAE) in CPU memory while
            pruning.
    """

    statistics: bool = False
    components: bool = False


@dataclass(frozen=True)
class Placement:
    """Where calibration and the solve keep their work: offloaded or not, and with several
    ranks whether each solves its share of a package (`RunnerSettings.shard_solve`). Not part
    of a run's key."""

    offload: Offload
    shard_solve: bool


@dataclass
class LoopReport:
    records: list[Record] = field(default_factory=list)  # what the method (and modulation) did
    calibration_seconds: float = 0.0
    solve_seconds: float = 0.0
    packages_done: int = 0


def build_package(
    denoiser: nn.Module,
    units: list[UnitRef],
    method: PruningMethod,
    target: Target,
    hessian_precision: str = "float32",
    adapter: ModelAdapter | None = None,
    all_kinds: bool = False,
    offload: bool = False,
) -> Package:
    """One input group per input the package's linears read, with fresh statistics if the
    method needs them (`all_kinds`: the Hessian and the moments, whatever it needs: a cache
    entry serves every method; `offload`: in CPU memory, pinned when CUDA is there) and, with
    `adapter`, which linears belong to a feed-forward network; for a `Structured` target
    (which needs `adapter`) also the head and neuron groups it holds."""
    pin = offload and torch.cuda.is_available()
    groups = []
    for unit in units:
        for group in unit.groups:
            names = [f"{unit.block_name}.{name}" for name in group]
            modules = [linear_at(denoiser, name) for name in names]
            stats = None
            if method.needs_calibration:
                stats = InputStatistics(
                    modules[0].in_features,
                    hessian=method.needs_hessian or all_kinds,
                    moments=method.needs_moments or all_kinds,
                    device="cpu" if offload else modules[0].weight.device,
                    hessian_precision=hessian_precision,
                    pin_memory=pin,
                )
            ffn = [adapter.is_ffn(name) for name in names] if adapter is not None else []
            groups.append(InputGroup(names, modules, stats, ffn))
    blocks = []
    if isinstance(target, Structured):
        assert adapter is not None, "structured packages need the model adapter"
        blocks = structured_blocks(adapter, denoiser, units)
    return Package(groups, blocks)


def structured_blocks(
    adapter: ModelAdapter, denoiser: nn.Module, units: list[UnitRef]
) -> list[StructuredBlock]:
    """Per block of the package: the head groups all of whose consumers, and the neuron groups
    whose down-projection, the package holds."""
    held = {name for unit in units for name in unit.module_names}
    blocks = []
    for block_name in dict.fromkeys(unit.block_name for unit in units):
        block = denoiser.get_submodule(block_name)
        heads, neurons = adapter.structured_groups(block)
        blocks.append(
            StructuredBlock(
                block_name,
                block,
                [g for g in heads if all(f"{block_name}.{n}" in held for n, _ in g.consumers)],
                [g for g in neurons if f"{block_name}.{g.consumer[0]}" in held],
            )
        )
    return blocks


def unit_groups(
    adapter: ModelAdapter, denoiser: nn.Module, packages: list[list[UnitRef]]
) -> list[UnitGroup]:
    """Every head and neuron group the packages will prune (`structured_blocks`), in the
    denoiser's names: what a method that scores units before the packages run reads."""
    return [
        group
        for package in packages
        for block in structured_blocks(adapter, denoiser, package)
        for group in block.unit_groups()
    ]


def statistics_bytes(
    denoiser: nn.Module, package: list[UnitRef], method: PruningMethod, all_kinds: bool = False
) -> int:
    """Memory the package's statistics will take, from the layer shapes alone (`all_kinds`:
    the Hessian and the moments, as for a statistics cache entry)."""
    hessian, moments = method.needs_hessian or all_kinds, method.needs_moments or all_kinds
    return sum(
        InputStatistics.sum_bytes(
            linear_at(denoiser, f"{unit.block_name}.{group[0]}").in_features, hessian, moments
        )
        for unit in package
        for group in unit.groups
    )


def package_statistics_bytes(
    denoiser: nn.Module,
    packages: list[list[UnitRef]],
    method: PruningMethod,
    cached_first: bool = False,
) -> list[int]:
    """The statistics of each package (none for a method without calibration;
    `cached_first`: the first package's hold every kind, `build_package(all_kinds=True)`)."""
    if not method.needs_calibration:
        return [0] * len(packages)
    return [
        statistics_bytes(denoiser, p, method, all_kinds=cached_first and i == 0)
        for i, p in enumerate(packages)
    ]


def peak_statistics_bytes(
    denoiser: nn.Module,
    packages: list[list[UnitRef]],
    method: PruningMethod,
    cached_first: bool = False,
) -> int:
    """The calibration statistics held at once: those of the largest package. More packages,
    smaller packages: the paper's Table 7 memory."""
    return max(package_statistics_bytes(denoiser, packages, method, cached_first), default=0)


def embed_batches(
    adapter: ModelAdapter,
    pipe: DiffusionPipeline,
    prompts: list[str],
    batch_size: int,
    device: torch.device,
) -> list[dict[str, torch.Tensor]]:
    """Prompt embeddings per calibration batch, computed once."""
    with torch.inference_mode():
        return [
            adapter.encode_prompts(pipe, prompts[start : start + batch_size], device)
            for start in range(0, len(prompts), batch_size)
        ]


def calibrate_and_prune(
    pipe: DiffusionPipeline,
    adapter: ModelAdapter,
    method: PruningMethod,
    target: Target,
    packages: list[list[UnitRef]],
    step_weights: torch.Tensor | dict[str, torch.Tensor],
    embeddings: list[dict[str, torch.Tensor]],
    settings: CalibrationSettings,
    placement: Placement,
    start_package: int = 0,
    on_package_done: Callable[[int, LoopReport], None] | None = None,
    parallel: DataParallel | None = None,
    first_prompt: int = 0,
    cache: StatisticsCache | None = None,
    cache_key: str | None = None,
    modulation: LowRankModulation | None = None,
) -> LoopReport:
    """Run the loop from package `start_package` on: calibrate each package, then
    `solve_package(method, package, target)`; `on_package_done(index, report)` follows it.

    Data-parallel: `embeddings` hold this rank's prompts, the first of which is prompt number
    `first_prompt` of the whole set (its noise seed); the statistics are summed over the ranks
    before the package is solved, so every rank prunes with the statistics of all prompts.

    `step_weights`: alpha_t per denoising step (T,), or per timestep expert (`expert_weights`:
    each expert's linears weighted by its own).

    With `cache` and `cache_key` (`obsdiff.calibration.cache`), the first package's statistics
    are read from the cache when it holds them, else computed and written there. `placement`
    says where the work lives.

    With `modulation`, the modulation linears' statistics are gathered in the first package's
    pass (a pass of their own where the method calibrates nothing or the cache holds the
    package's: the modulation reads the conditioning vector alone, which no pruning changes),
    and the linears are factorised after that package's solve, so the later packages calibrate
    on the compressed modulation.

    A method with `token_weighting` (importance-weighted OBS) gets its importance maps from one
    dense sampling pass over the calibration prompts before the first package
    (`obsdiff.calibration.importance`; its seconds count as calibration), which every package's
    statistics hooks weight the token rows with."""
    parallel = parallel or DataParallel()
    denoiser = adapter.denoiser(pipe)
    by_expert = step_weights if isinstance(step_weights, dict) else {"": step_weights}
    weighting = str(getattr(method, "token_weighting", NO_TOKEN_WEIGHTING))
    weighted = weighting != NO_TOKEN_WEIGHTING and start_package < len(packages)
    unconditional = None
    needs_branch = weighted and weighting == CFG_RESPONSE and adapter.cfg_mode() == CFG_NONE
    if needs_branch:  # the empty prompt's conditioning, while the text encoders are on the device
        counts = [next(iter(batch.values())).shape[0] for batch in embeddings]
        unconditional = empty_conditioning(adapter, pipe, counts)
    with components_released(pipe, denoiser, placement.offload.components):
        tracker = StepTracker()
        report = LoopReport(packages_done=start_package)
        cfg_mode = adapter.cfg_mode()
        found: list[ImportanceMaps] = []

        def maps() -> ImportanceMaps | None:
            """The importance maps of a weighted method, computed on first use."""
            if weighted and not found:
                if start_package > 0:
                    log.warning(
                        "resuming at package %d with method.token_weighting=%s: the importance "
                        "maps come from the model as restored (packages 1-%d pruned), not the "
                        "dense one",
                        start_package + 1,
                        weighting,
                        start_package,
                    )
                steps = len(next(iter(by_expert.values())))
                found.append(
                    importance_maps(
                        pipe,
                        adapter,
                        embeddings,
                        steps,
                        settings.seed,
                        first_prompt,
                        unconditional,
                        weighting,
                    )
                )
            return found[0] if found else None

        # the maps now, on the dense model; a lone package the cache may serve needs them only
        # if it calibrates (then on the dense model still, timed with its calibration)
        if len(packages) - start_package > 1 or cache is None or cache_key is None:
            ahead = maps()
            if ahead is not None:
                report.calibration_seconds += ahead.seconds
        for index in progress(range(start_package, len(packages)), "packages", "package"):
            cached = cache is not None and cache_key is not None and index == 0
            package = build_package(
                denoiser,
                packages[index],
                method,
                target,
                settings.hessian_precision,
                adapter,
                all_kinds=cached,
                offload=placement.offload.statistics,
            )
            started = time.perf_counter()
            hit = False
            if cached and method.needs_calibration:
                assert cache is not None and cache_key is not None
                hit = cache.load(cache_key, package)
            groups = [] if hit else [g for g in package.groups if g.stats]
            fed = [(g.modules[0], g.stats) for g in groups if g.stats]
            names = adapter.modulation_linears(denoiser) if modulation and index == 0 else []
            device = "cpu" if placement.offload.statistics else None
            modulated = modulation_statistics(denoiser, names, device)
            if fed or modulated:
                fed_names = [g.names[0] for g in groups] + names
                hooks = StatisticsHooks(
                    denoiser,
                    fed + modulated,
                    next(iter(by_expert.values())),
                    tracker,
                    group_weights=[by_expert[expert_of(n, denoiser)] for n in fed_names],
                    cfg_mode=cfg_mode,
                    include_uncond=settings.include_uncond,
                    max_tokens=settings.max_tokens,
                    seed=settings.seed,
                    importance=maps() if fed else None,
                )
                with hooks.attached(), torch.inference_mode():
                    offset = first_prompt
                    desc = f"package {index + 1}/{len(packages)}"
                    for batch in progress(embeddings, desc, "batch", leave=False):
                        count = next(iter(batch.values())).shape[0]
                        tracker.reset()
                        hooks.batch(offset, count)
                        generators = image_generators(settings.seed, offset, count)
                        adapter.calibration_call(pipe, batch, generators, tracker.on_step_end)
                        offset += count
                states = (t for _, stats in fed + modulated for t in stats.state_tensors())
                parallel.all_reduce_(states)
                if cached and fed and parallel.is_main:
                    assert cache is not None and cache_key is not None
                    cache.save(cache_key, package)
            calibrated = time.perf_counter()
            with torch.no_grad():
                report.records.extend(
                    solve_package(method, package, target, parallel, placement.shard_solve)
                )
                if modulated:
                    assert modulation is not None
                    statistics = [stats for _, stats in modulated]
                    report.records.extend(
                        compress_modulation(denoiser, names, statistics, modulation)
                    )
            solved = time.perf_counter()
            report.calibration_seconds += calibrated - started
            report.solve_seconds += solved - calibrated
            report.packages_done = index + 1
            log.info(
                "package %d/%d: %d layers, calibration %.1f s, solve %.1f s",
                index + 1,
                len(packages),
                sum(len(g.modules) for g in package.groups),
                calibrated - started,
                solved - calibrated,
            )
            del package
            if on_package_done is not None:
                on_package_done(index, report)
        return report


@contextmanager
def components_released(
    pipe: DiffusionPipeline, denoiser: nn.Module, release: bool
) -> Iterator[None]:
    """With `release`, every pipeline component but the denoiser (text encoders, VAE) in CPU
    memory for the block, back on the denoiser's device after it (calibration calls the
    pipeline with precomputed embeddings and stops at the latents)."""
    device = next(denoiser.parameters()).device
    moved = []
    if release and device.type != "cpu":
        for name, component in pipe.components.items():
            if isinstance(component, nn.Module) and component is not denoiser:
                component.to("cpu")
                moved.append(name)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("released from %s while pruning: %s", device, ", ".join(moved) or "nothing")
    try:
        yield
    finally:
        for name in moved:
            pipe.components[name].to(device)
