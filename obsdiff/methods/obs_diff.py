"""OBS-Diff: OBS with the timestep-aware Hessian; every input group of a package solved together."""

from __future__ import annotations

from dataclasses import dataclass

from obsdiff.methods.base import GroupJob, LayerRecord, PruningMethod, write_weight
from obsdiff.pruning.obs import ObsProblem, obs_prune_problems
from obsdiff.pruning.patterns import Pattern


@dataclass
class ObsDiff(PruningMethod):
    percdamp: float = 0.01
    blocksize: int = 128
    compensate: bool = True
    normaliser: str = "sample"

    name = "obsdiff"
    granularities = ("unstructured", "nm")
    needs_hessian = True

    def __post_init__(self) -> None:
        if self.percdamp < 0 or self.blocksize < 1:
            raise ValueError("obsdiff needs percdamp >= 0 and blocksize >= 1")

    def prune_groups(self, groups: list[GroupJob], pattern: Pattern) -> list[LayerRecord]:
        problems = []
        for group in groups:
            assert group.stats is not None
            H = group.stats.hessian_matrix(self.normaliser)
            problems.append(ObsProblem(H, [m.weight.data for m in group.modules]))
        results = obs_prune_problems(
            problems,
            pattern,
            blocksize=self.blocksize,
            percdamp=self.percdamp,
            compensate=self.compensate,
        )
        records = []
        for group, group_results in zip(groups, results, strict=True):
            for name, module, result in zip(group.names, group.modules, group_results, strict=True):
                write_weight(module, result.weight, result.mask)
                records.append(
                    LayerRecord(
                        name, tuple(module.weight.shape), int(result.mask.sum()), result.loss
                    )
                )
        return records
