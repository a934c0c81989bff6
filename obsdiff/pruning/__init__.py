"""obsdiff.pruning: the pure tensor math of OBS-Diff and its baselines (no diffusers inside).

Timestep weighting (Eq. 4)      uniform, linear_increase, linear_decrease, log_increase,
                                log_decrease, explicit, timestep_weights, SCHEDULES
Calibration statistics (Eq. 5)  InputStatistics
Sparsity patterns and masks     Unstructured, NM, num_to_prune, mask_for
OBS (Eq. 1-2)                   obs_prune, obs_prune_problems, ObsProblem, ObsResult,
                                obs_saliency, inverse_cholesky_upper, HessianFactorizationError
OBS structured (Eq. 6-8)        obs_prune_neurons, obs_prune_heads, head_saliency,
                                reciprocal_rank_fusion, rrf_choice, structured_count,
                                StructuredResult
Baselines                       magnitude_prune, wanda_prune, wanda_scores, dsnot_prune,
                                dsnot_refine, l1_unit_scores, l1_select
"""

from obsdiff.pruning.dsnot import dsnot_prune, dsnot_refine
from obsdiff.pruning.gates import closed_units, gate_values
from obsdiff.pruning.l1 import l1_select, l1_unit_scores
from obsdiff.pruning.magnitude import magnitude_mask, magnitude_prune
from obsdiff.pruning.obs import (
    HessianFactorizationError,
    ObsProblem,
    ObsResult,
    inverse_cholesky_upper,
    obs_prune,
    obs_prune_problems,
    obs_saliency,
)
from obsdiff.pruning.obs_structured import (
    StructuredResult,
    head_saliency,
    obs_prune_heads,
    obs_prune_neurons,
    reciprocal_rank_fusion,
    rrf_choice,
    structured_count,
)
from obsdiff.pruning.patterns import NM, Unstructured, mask_for, num_to_prune
from obsdiff.pruning.schedules import (
    SCHEDULES,
    explicit,
    linear_decrease,
    linear_increase,
    log_decrease,
    log_increase,
    timestep_weights,
    uniform,
)
from obsdiff.pruning.statistics import InputStatistics
from obsdiff.pruning.taylor import TaylorScores, taylor_scores
from obsdiff.pruning.wanda import wanda_mask, wanda_prune, wanda_scores


__all__ = [
    "NM",
    "SCHEDULES",
    "HessianFactorizationError",
    "InputStatistics",
    "ObsProblem",
    "ObsResult",
    "StructuredResult",
    "TaylorScores",
    "Unstructured",
    "closed_units",
    "dsnot_prune",
    "dsnot_refine",
    "explicit",
    "gate_values",
    "head_saliency",
    "inverse_cholesky_upper",
    "l1_select",
    "l1_unit_scores",
    "linear_decrease",
    "linear_increase",
    "log_decrease",
    "log_increase",
    "magnitude_mask",
    "magnitude_prune",
    "mask_for",
    "num_to_prune",
    "obs_prune",
    "obs_prune_heads",
    "obs_prune_neurons",
    "obs_prune_problems",
    "obs_saliency",
    "reciprocal_rank_fusion",
    "rrf_choice",
    "structured_count",
    "taylor_scores",
    "timestep_weights",
    "uniform",
    "wanda_mask",
    "wanda_prune",
    "wanda_scores",
]
