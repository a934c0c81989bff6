"""OBS-Diff: OBS with the timestep-aware Hessian; every input group of a package solved together."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from obsdiff.methods.base import PruningMethod
from obsdiff.methods.package import InputGroup, LayerRecord, UnitGroup, write_weight
from obsdiff.models.base import ModelAdapter
from obsdiff.pruning.obs import ObsProblem, obs_batches, obs_prune_problems
from obsdiff.pruning.obs_structured import HEAD_SALIENCIES, obs_prune_heads, obs_prune_neurons
from obsdiff.pruning.patterns import Pattern
from obsdiff.pruning.statistics import NORMALISERS


# How the token rows of a calibration call are weighted in the Hessian
# (`obsdiff.calibration.importance`): `none`, every row alike (the paper); `cfg_response`, by the
# dense model's classifier-free-guidance response at the token's position; `attention`, by the
# attention the position receives in the dense model's self and joint attention.
NO_TOKEN_WEIGHTING, CFG_RESPONSE, ATTENTION = TOKEN_WEIGHTINGS = (
    "none",
    "cfg_response",
    "attention",
)


@dataclass
class ObsDiff(PruningMethod):
    """OBS-Diff (the paper): OBS with the timestep-aware Hessian, module packages.

    Attributes:
        percdamp: Damping, a fraction of mean(diag H).
        blocksize: Lazy-batch columns (and the unit of the adaptive unstructured mask).
        compensate: False: OBS mask selection only, no weight update (an ablation).
        normaliser: H divided by sum alpha * samples (`sample`, the reference code) or by
            tokens (`token`).
        head_saliency: Structured heads: `reference` (the code's), `eq7` (as printed) or
            `exact`.
        rrf_k: The reciprocal rank fusion constant across the two MMDiT streams (Eq. 8).
        solve_batch_gb: Equal-size layers are solved in batches of at most this workspace (GB;
            null: any size).
        token_weighting: Importance-weighted OBS: each token row x_i enters the Hessian as
            w_i x_i^T x_i. `none` (the paper: every row alike) or `cfg_response` (w from the
            dense model's |eps(x_t, c) - eps(x_t, uncond)| at the token's position, mean 1 per
            sample) or `attention` (w from the attention the position receives in the dense
            model's self and joint attention); either takes one more dense sampling pass over
            the calibration prompts.
    """

    percdamp: float = 0.01
    blocksize: int = 128
    compensate: bool = True
    normaliser: str = "sample"
    head_saliency: str = "reference"
    rrf_k: float = 60.0
    solve_batch_gb: float | None = 1.0
    token_weighting: str = NO_TOKEN_WEIGHTING

    name = "obsdiff"
    granularities = ("unstructured", "nm", "structured")
    needs_hessian = True

    def __post_init__(self) -> None:
        if self.percdamp < 0:
            raise ValueError(f"method.percdamp={self.percdamp} must be >= 0; e.g. 0.01")
        if self.blocksize < 1:
            raise ValueError(f"method.blocksize={self.blocksize} must be >= 1; e.g. 128")
        if self.solve_batch_gb is not None and self.solve_batch_gb <= 0:
            raise ValueError(f"method.solve_batch_gb={self.solve_batch_gb} must be > 0 (or null)")
        if self.normaliser not in NORMALISERS:
            raise ValueError(
                f"method.normaliser={self.normaliser!r}; use one of {', '.join(NORMALISERS)}"
            )
        if self.head_saliency not in HEAD_SALIENCIES:
            raise ValueError(
                f"method.head_saliency={self.head_saliency!r}; use one of "
                f"{', '.join(HEAD_SALIENCIES)}"
            )
        if self.token_weighting not in TOKEN_WEIGHTINGS:
            raise ValueError(
                f"method.token_weighting={self.token_weighting!r}; use one of "
                f"{', '.join(TOKEN_WEIGHTINGS)}"
            )

    def check_model(self, model: ModelAdapter) -> None:
        if self.token_weighting == ATTENTION and model.joint_attention is None:
            raise ValueError(
                f"method.token_weighting=attention: the attention maps of model={model.name} "
                f"({model.family}) cannot be read; use method.token_weighting=cfg_response"
            )

    @property
    def batch_bytes(self) -> float | None:
        return None if self.solve_batch_gb is None else self.solve_batch_gb * 1e9

    def solve_units(self, shapes: list[tuple[int, int]]) -> list[list[int]]:
        return obs_batches(shapes, self.batch_bytes)

    def select_heads(
        self,
        consumers: list[torch.Tensor],
        hessians: list[torch.Tensor | None],
        producers: list[torch.Tensor],
        head_dim: int,
        count: int,
        where: UnitGroup,
    ) -> tuple[list[torch.Tensor], list[int]]:
        result = obs_prune_heads(
            consumers,
            [h for h in hessians if h is not None],
            head_dim,
            count,
            percdamp=self.percdamp,
            rrf_k=self.rrf_k,
            saliency=self.head_saliency,
            compensate=self.compensate,
        )
        return result.weights, result.removed.tolist()

    def select_neurons(
        self,
        consumer: torch.Tensor,
        hessian: torch.Tensor | None,
        producers: list[torch.Tensor],
        count: int,
        where: UnitGroup,
    ) -> tuple[torch.Tensor, list[int]]:
        assert hessian is not None
        result = obs_prune_neurons(
            consumer, hessian, count, percdamp=self.percdamp, compensate=self.compensate
        )
        return result.weights[0], result.removed.tolist()

    def prune_groups(self, groups: list[InputGroup], pattern: Pattern) -> list[LayerRecord]:
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
            batch_bytes=self.batch_bytes,
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
