"""The memory plan of a prune job, from the model's architecture alone (no weights loaded).

    plan = memory_plan(job)          # job.model built on the meta device from its config files
    print(plan.table())
    choose_packages(job, budget_bytes=24e9)   # packages=auto: the fewest packages that fit

What the prune run holds on its device at its peak, and what the plan counts:
- the weights of every pipeline component at the model's dtype (the run moves the whole pipeline
  to the device; components the config drops, e.g. SD3's T5 with `with_t5: false`, are not
  counted); with `offload.components` only the denoiser's;
- the calibration statistics of the largest package (`InputStatistics.sum_bytes` per input read
  by the package's linears: an n x n Hessian for OBS, 3 n moments for Wanda and DSnoT, float32):
  the only term the package count changes (the paper's Table 7); with a statistics cache
  (`job.statistics_cache`) the first package holds both kinds; with `offload.statistics` they
  are held in CPU memory instead (the plan's host term);
- a gradient method's scores (Diff-Pruning: `PruningMethod.scoring_bytes`, one float32 per
  weight or, structured, per row and column, plus one layer's gradient), held before the
  packages run, against which the statistics count (the larger of the two);
- the solve of the costliest work unit (`PruningMethod.solve_units`: OBS-Diff batches layers of
  equal size up to `solve_batch_gb`), each input group's `PruningMethod.solve_bytes` (for OBS
  `obs_workspace_bytes`), plus, with offloaded statistics, the unit's statistics moved to the
  device for it.

It also says what the model is made of (`obsdiff.models.roles`: attention, FFN, modulation,
embeddings, the rest) and what the job can reach: the weights of its target linears (the share a
sparsity zeroes), or the linears structured pruning cuts, and what low-rank modulation saves.

Not predicted: activations of the calibration forward (small at the paper's 512 x 512, a few
hundred MB at most), the CUDA context and the allocator's caching; measure them on the device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from obsdiff.calibration.packages import UnitRef
from obsdiff.calibration.sequential import package_statistics_bytes, unit_groups
from obsdiff.methods.package import Depth, Structured
from obsdiff.models.experts import Experts
from obsdiff.models.roles import ParameterRoles, parameter_roles
from obsdiff.models.structure import linear_at
from obsdiff.oneshot.job import JobError, PruneJob, depth_candidates, plan_packages
from obsdiff.pruning.statistics import InputStatistics
from obsdiff.utils.memory import module_bytes


log = logging.getLogger(__name__)

GB = 1e9


@dataclass
class MemoryPlan:
    """What a prune job will hold on its device, in bytes (see the module docstring)."""

    model: str
    dtype: str
    method: str
    packages: int
    components: dict[str, int]  # weights of each pipeline component at the model's dtype
    package_statistics: list[int]  # calibration statistics of each package
    solve_bytes: int  # the costliest work unit's solve workspace
    scoring_bytes: int = 0  # a method's pass before the packages (Diff-Pruning's Taylor scores)
    denoisers: tuple[str, ...] = ()  # the denoiser's component names (timestep experts: each)
    offload_statistics: bool = False  # statistics in CPU memory
    offload_components: bool = False  # only the denoiser on the device
    roles: ParameterRoles | None = None  # the denoiser's parameters by role
    reach: list[str] = field(default_factory=list)  # what the job's compression reaches

    @property
    def weights_bytes(self) -> int:
        """The weights on the device while pruning."""
        if self.offload_components:
            return sum(self.components[name] for name in self.denoisers)
        return sum(self.components.values())

    @property
    def device_statistics_bytes(self) -> int:
        return 0 if self.offload_statistics else self.statistics_peak_bytes

    @property
    def host_statistics_bytes(self) -> int:
        """Statistics held in CPU memory (offloaded), besides the pipeline's CPU copy."""
        return self.statistics_peak_bytes if self.offload_statistics else 0

    @property
    def statistics_peak_bytes(self) -> int:
        return max(self.package_statistics, default=0)

    @property
    def statistics_total_bytes(self) -> int:
        return sum(self.package_statistics)

    @property
    def predicted_peak_bytes(self) -> int:
        """On the device: weights + the larger of the method's scoring pass and the largest
        package's statistics (unless offloaded) + the costliest solve (the scores are freed
        as their packages are pruned, the statistics come after the pass)."""
        held = max(self.scoring_bytes, self.device_statistics_bytes)
        return self.weights_bytes + held + self.solve_bytes

    def fits(self, budget_bytes: float) -> bool:
        return self.predicted_peak_bytes <= budget_bytes

    def table(self) -> str:
        """The plan as a few aligned lines (GB = 1e9 bytes)."""
        offloaded = [
            what
            for what, on in (
                ("statistics", self.offload_statistics),
                ("components", self.offload_components),
            )
            if on
        ]
        lines = [
            f"memory plan: {self.model} ({self.dtype}), {self.method}, {self.packages} packages"
            + (f", offloaded: {' and '.join(offloaded)}" if offloaded else "")
        ]
        for name, size in sorted(self.components.items()):
            where = " (CPU)" if self.offload_components and name not in self.denoisers else ""
            lines.append(f"  {name:<28} {size / GB:9.3f} GB{where}")
        which = "denoiser only" if self.offload_components else "all components"
        lines.append(f"  {'weights, ' + which:<28} {self.weights_bytes / GB:9.3f} GB")
        where = " (CPU)" if self.offload_statistics else ""
        lines.append(
            f"  {'statistics, largest package':<28} {self.statistics_peak_bytes / GB:9.3f} GB"
            f"{where}  (all packages: {self.statistics_total_bytes / GB:.3f} GB)"
        )
        lines.append(f"  {'solve, costliest unit':<28} {self.solve_bytes / GB:9.3f} GB")
        if self.scoring_bytes:
            lines.append(
                f"  {'scoring pass (gradients)':<28} {self.scoring_bytes / GB:9.3f} GB"
                "  (+ one backward's activations: not predicted)"
            )
        lines.append(
            f"  {'predicted peak':<28} {self.predicted_peak_bytes / GB:9.3f} GB"
            "  (+ activations, CUDA context: not predicted)"
        )
        if self.roles is not None:
            total = self.roles.total
            lines.append(f"parameters of the {' + '.join(self.denoisers)}: {total / 1e9:.3f} B")
            for role, count in self.roles.counts.items():
                note = ""
                if role == "modulation" and count:
                    note = f"  (blocks {self.roles.block_modulation / 1e9:.3f} B)"
                lines.append(f"  {role:<28} {count / 1e9:9.3f} B {count / total:6.1%}{note}")
        lines += [f"  {line}" for line in self.reach]
        return "\n".join(lines)


def memory_plan(job: PruneJob, components: dict[str, nn.Module] | None = None) -> MemoryPlan:
    """The plan of `job` from its model's architecture (`components`: the pipeline's weighted
    modules, by default `job.model.component_skeletons()`, built without weights)."""
    components = job.model.component_skeletons() if components is None else components
    denoiser = job.model.denoiser_of(components)
    packages, targets = plan_packages(job, denoiser)
    cached_first = job.statistics_cache is not None
    per_package = package_statistics_bytes(denoiser, packages, job.method, cached_first)
    offload = job.placement.offload.statistics
    method = job.method
    costliest = 0
    for index, package in enumerate(packages):
        shapes = []
        for unit in package:
            for group in unit.groups:
                linears = [linear_at(denoiser, f"{unit.block_name}.{n}") for n in group]
                shapes.append((linears[0].in_features, sum(m.out_features for m in linears)))
        all_kinds = cached_first and index == 0
        hessian, moments = method.needs_hessian or all_kinds, method.needs_moments or all_kinds
        group_bytes = []  # each input group's solve (and its statistics, moved over if offloaded)
        for n, rows in shapes:
            size = method.solve_bytes(n, rows)
            if offload and method.needs_calibration:
                size += InputStatistics.sum_bytes(n, hessian, moments)
            group_bytes.append(size)
        structured = isinstance(job.target, Structured)
        units = [[i] for i in range(len(shapes))] if structured else method.solve_units(shapes)
        costliest = max([costliest, *(sum(group_bytes[i] for i in unit) for unit in units)])
    roles = parameter_roles(job.model, denoiser)
    structured = isinstance(job.target, Structured)
    scored = (
        {
            n
            for g in unit_groups(job.model, denoiser, packages)
            for n, _ in g.producers + g.consumers
        }
        if structured
        else {name for name, _ in targets}
    )
    scored_shapes = [tuple(linear_at(denoiser, n).weight.shape) for n in sorted(scored)]
    return MemoryPlan(
        model=job.model.name,
        dtype=job.model.dtype,
        method=type(job.method).__name__,
        packages=len(packages),
        components={name: module_bytes(m) for name, m in components.items()},
        package_statistics=per_package,
        solve_bytes=costliest,
        scoring_bytes=method.scoring_bytes(scored_shapes, structured),  # type: ignore[arg-type]
        denoisers=job.model.expert_names(components),
        offload_statistics=offload and method.needs_calibration,
        offload_components=job.placement.offload.components,
        roles=roles,
        reach=reach(job, denoiser, roles, packages, [m for _, m in targets]),
    )


def reach(
    job: PruneJob,
    denoiser: nn.Module,
    roles: ParameterRoles,
    packages: list[list[UnitRef]],
    targets: list[nn.Linear],
) -> list[str]:
    """What the job's granularity and modulation reach, as lines: the target linears' weights
    and what its sparsity zeroes (unstructured, N:M), or the weights of the linears whose heads
    and neurons structured pruning removes (about the sparsity's share of them goes); the
    weights low-rank modulation saves (exact for a rank or a budget; an energy's rank is
    chosen after calibration)."""
    total = roles.total
    whole = (
        " + ".join(name for name, _ in denoiser.named_children())
        if isinstance(denoiser, Experts)
        else job.model.denoiser_attr
    )

    def amount(count: float) -> str:
        return f"{count / 1e9:.3f} B ({count / total:.1%} of the {whole})"

    weights = sum(m.weight.numel() for m in targets)
    name = f"{job.method.name} {job.granularity.name} {job.sparsity:g}"
    if isinstance(job.target, Depth):  # the criterion picks which: as small or as large as can be
        candidates, count = depth_candidates(job, denoiser)
        sizes = sorted(
            sum(p.numel() for p in denoiser.get_submodule(n).parameters()) for n in candidates
        )
        fewest, most = sum(sizes[:count]), sum(sizes[len(sizes) - count :])
        removed = amount(fewest) if fewest == most else f"{amount(fewest)} to {amount(most)}"
        lines = [f"{name}: {count} of {len(candidates)} candidate blocks go, {removed}"]
    elif isinstance(job.target, Structured):  # the producers too: every linear a group cuts
        blocks = dict(job.model.blocks(denoiser))
        cut: set[str] = set()
        for block_name in dict.fromkeys(unit.block_name for p in packages for unit in p):
            heads, neurons = job.model.structured_groups(blocks[block_name])
            names = [n for g in heads for n, _ in (*g.producers, *g.consumers)]
            names += [n for g in neurons for n in (*(p for p, _ in g.producers), g.consumer[0])]
            cut.update(f"{block_name}.{n}" for n in names)
        weights = sum(linear_at(denoiser, n).weight.numel() for n in cut)
        lines = [
            f"structured pruning cuts into linears of {amount(weights)}; {name}: about "
            f"{amount(job.sparsity * weights)} removed"
        ]
    else:
        lines = [
            f"target linears: {amount(weights)}; {name}: {amount(job.sparsity * weights)} zeroed"
        ]
    modulation = roles.counts["modulation"]
    if job.modulation is None:
        lines.append(f"modulation (modulation=low_rank reaches it): {amount(modulation)}")
        return lines
    if job.modulation.energy is not None:
        lines.append(
            f"low-rank modulation: of {amount(modulation)}, the saving follows the ranks "
            f"energy {job.modulation.energy} chooses after calibration"
        )
        return lines
    saved = 0
    for linear_name in job.model.modulation_linears(denoiser):
        out_features, in_features = linear_at(denoiser, linear_name).weight.shape
        rank = job.modulation.choose_rank(torch.empty(0), (out_features, in_features))
        saved += max(0, out_features * in_features - rank * (out_features + in_features))
    lines.append(f"low-rank modulation: of {amount(modulation)}, {amount(saved)} fewer")
    return lines


def choose_packages(
    job: PruneJob, budget_bytes: float, components: dict[str, nn.Module] | None = None
) -> PruneJob:
    """`job` with the fewest packages whose predicted peak fits `budget_bytes`, or one
    JobError saying what the model needs and what would make it fit."""
    components = job.model.component_skeletons() if components is None else components
    denoiser = job.model.denoiser_of(components)
    units = sum(len(p) for p in plan_packages(replace(job, packages=1), denoiser)[0])
    for count in range(1, units + 1):
        plan = memory_plan(replace(job, packages=count), components)
        if plan.fits(budget_bytes):
            log.info(
                "packages=auto: %d packages, predicted peak %.2f GB of a %.2f GB budget",
                count,
                plan.predicted_peak_bytes / GB,
                budget_bytes / GB,
            )
            return replace(job, packages=count)
    finest = memory_plan(replace(job, packages=units), components)
    fixed = finest.weights_bytes + finest.solve_bytes
    if fixed > budget_bytes:
        advice = "the weights and the costliest solve alone exceed it: "
        if not job.placement.offload.components:
            advice += "keep only the denoiser on the device (offload.components=true), or "
        advice += (
            "use a device with more memory, or drop a component the calibration does not need "
            "(SD3 and SD3.5: model.with_t5=false)"
        )
    elif not job.placement.offload.statistics:
        advice = (
            "the statistics of its largest single unit do not fit beside them: keep them in "
            "CPU memory (offload.statistics=true), or use a device of at least "
            f"{finest.predicted_peak_bytes / GB:.1f} GB"
        )
    else:
        advice = f"it needs a device of at least {finest.predicted_peak_bytes / GB:.1f} GB"
    raise JobError(
        f"packages=auto: no package count fits memory_budget={budget_bytes / GB:g} GB. "
        f"{job.model.name} ({job.model.dtype}) holds {finest.weights_bytes / GB:.2f} GB of "
        f"weights on the device and {finest.solve_bytes / GB:.2f} GB for its costliest solve, "
        f"{finest.predicted_peak_bytes / GB:.2f} GB at its peak with one unit a package "
        f"({units} packages): {advice}."
    )
