"""DSnoT (Zhang et al., 2024): training-free prune-and-grow on top of an initial mask.

As `zyxxmu/DSnoT:lib/prune.py::prune_DSnoT`. With c_ij = W_ij * E[x_j] (E[x_j]: mean over samples
of the per-sample sum over tokens, `InputStatistics.column_sum_per_sample`), row i's expected
output shift from pruning is eps_i = sum over pruned j of c_ij. Each cycle makes one swap per row:

* grow the pruned weight ranked at one end of c_ij / Var(x_j)^power (kept weights rank as 0):
  the most positive one if eps_i > 0, the most negative one otherwise;
* prune a kept weight: unstructured, the next of the kept weights ordered by Wanda score with
  negative contributions first (ascending) and positive ones last (descending), from the front
  if eps_i > 0 and from the back if eps_i < 0; N:M, the kept weight with the lowest initial
  score in the regrown weight's group of M (the pattern is preserved);
* accept while |eps_i| > threshold (and, if the sign check is on, eps_i keeps its initial sign);
  a row that rejects once stops. At most `max_cycles` cycles (official default 50).

Official defaults, obsdiff's too: threshold 0.1 on |eps_i| (absolute), variance power 1, sign
check off for unstructured (the official `--without_same_sign` flag cannot be switched off) and
on for N:M; the app may skip MLP layers (official `--skip_layer mlp`: they keep their initial
mask). The variance of input j is that of each calibration sample over its tokens, averaged
(`InputStatistics.column_variance`), as the official code, which feeds one sample at a time.
Deliberate differences, all documented: (1) a zero-variance (dead) input divides by the
smallest float instead of zero (the official code gets NaN there and may regrow weights on dead
inputs); (2) a swap is only accepted when the grow candidate is pruned and the prune candidate
is kept, and a pointer that runs off its list stops its row, so per-row sparsity (and N:M)
holds exactly where the official pointers could wander into the wrong set. Option:
`reference_tokens` rescales the threshold by tokens-per-sample / `reference_tokens` (e.g. 2048,
the LLaMA sequence length 0.1 was tuned on), since eps_i is a sum over a sample's tokens and
grows with their count; off by default (None), as the official code.
"""

from __future__ import annotations

import torch

from obsdiff.pruning.obs import obs_saliency
from obsdiff.pruning.patterns import NM, Pattern, mask_for
from obsdiff.pruning.statistics import InputStatistics
from obsdiff.pruning.wanda import wanda_scores


INITIAL_METHODS = ("wanda", "magnitude", "obs")


def _prune_order(kept_order: torch.Tensor, contribution: torch.Tensor) -> torch.Tensor:
    """Reorder kept weights (given in ascending Wanda order): negative contributions first in that
    order, zeros next, positive contributions last in reverse order. (rows, kept)"""
    value = contribution.gather(1, kept_order)  # (rows, kept)
    rank = torch.arange(kept_order.shape[1], device=value.device).expand_as(value)
    group = (value > 0).long() * 2 + (value == 0).long()  # negatives 0, zeros 1, positives 2
    within = torch.where(group == 2, kept_order.shape[1] - 1 - rank, rank)
    key = group * kept_order.shape[1] + within
    return kept_order.gather(1, torch.sort(key, dim=1, stable=True).indices)


@torch.no_grad()
def dsnot_refine(
    weight: torch.Tensor,
    initial_mask: torch.Tensor,
    column_signal: torch.Tensor,
    column_variance: torch.Tensor,
    initial_scores: torch.Tensor,
    pattern: Pattern,
    *,
    max_cycles: int = 50,
    update_threshold: float = 0.1,
    var_power: float = 1.0,
    same_sign: bool | None = None,
) -> torch.Tensor:
    """Refined mask (True = pruned).

    `initial_scores` (rows, n): the Wanda scores that order prune candidates (unstructured) or the
    initial metric (N:M). `same_sign=None` takes the official choice per pattern.
    """
    if max_cycles < 0 or update_threshold < 0:
        raise ValueError("max_cycles and update_threshold must be >= 0")
    nm = pattern if isinstance(pattern, NM) else None
    check_sign = nm is not None if same_sign is None else same_sign
    W = weight.to(torch.float32)
    rows, n = W.shape
    dev = W.device
    mask = initial_mask.clone().to(torch.bool)
    contribution = W * column_signal.to(dev, torch.float32).unsqueeze(0)  # c_ij, (rows, n)
    eps = (contribution * mask).sum(1)  # (rows,)
    initial_sign = torch.sign(eps)

    variance = column_variance.to(dev, torch.float32).clamp_min(torch.finfo(torch.float32).tiny)
    grow_metric = contribution.masked_fill(~mask, 0) / variance.pow(var_power).unsqueeze(0)
    grow_order = torch.sort(grow_metric, dim=1, stable=True).indices  # (rows, n)
    grow_ptr = torch.stack(
        [torch.zeros(rows, dtype=torch.long, device=dev), torch.full((rows,), n - 1, device=dev)], 1
    )  # (rows, 2): front and back pointers into grow_order

    if nm is not None:
        scores = initial_scores.to(torch.float32).masked_fill(mask, float("inf"))  # (rows, n)
        pruned_marker = (
            scores[torch.isfinite(scores)].max() + 1 if torch.isfinite(scores).any() else 0.0
        )
    else:
        kept_counts = (~mask).sum(1)
        if bool((kept_counts != kept_counts[0]).any()):
            raise ValueError(
                "unstructured DSnoT needs the same number of kept weights in every row"
            )
        n_kept = int(kept_counts[0])
        kept_order = torch.sort(
            initial_scores.to(torch.float32).masked_fill(mask, float("inf")), dim=1, stable=True
        )
        prune_order = _prune_order(kept_order.indices[:, :n_kept], contribution)  # (rows, kept)
        prune_ptr = torch.stack(
            [
                torch.zeros(rows, dtype=torch.long, device=dev),
                torch.full((rows,), n_kept - 1, device=dev),
            ],
            1,
        )  # (rows, 2): front and back pointers into prune_order

    row_ids = torch.arange(rows, device=dev)
    active = torch.ones(rows, dtype=torch.bool, device=dev)
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        side = (eps > 0).long()  # grow from the top end when eps > 0
        g_ptr = grow_ptr[row_ids, side]
        valid = (g_ptr >= 0) & (g_ptr < n)
        grow_idx = grow_order[row_ids, g_ptr.clamp(0, n - 1)]  # (rows,)
        grow_ptr[row_ids, side] += 1 - 2 * side
        if nm is not None:
            start = grow_idx - grow_idx % nm.m
            group = start.unsqueeze(1) + torch.arange(nm.m, device=dev)  # (rows, M)
            prune_idx = group.gather(1, scores.gather(1, group).argmin(1, keepdim=True)).squeeze(1)
        else:
            p_side = (eps < 0).long()  # prune from the back (positive contributions) when eps < 0
            p_ptr = prune_ptr[row_ids, p_side]
            valid &= (p_ptr >= 0) & (p_ptr < n_kept)
            prune_idx = prune_order[row_ids, p_ptr.clamp(0, n_kept - 1)]
            prune_ptr[row_ids, p_side] += 1 - 2 * p_side
        valid &= mask[row_ids, grow_idx] & ~mask[row_ids, prune_idx]
        eps_after = eps + contribution[row_ids, prune_idx] - contribution[row_ids, grow_idx]
        update = active & valid & (eps.abs() > update_threshold)
        if check_sign:
            update &= torch.sign(eps_after) == initial_sign
        if nm is not None:
            scores[row_ids, prune_idx] = pruned_marker
        changed = row_ids[update]
        mask[changed, grow_idx[update]] = False
        mask[changed, prune_idx[update]] = True
        eps = torch.where(update, eps_after, eps)
        active = update
    return mask


@torch.no_grad()
def dsnot_prune(
    weight: torch.Tensor,
    stats: InputStatistics,
    pattern: Pattern,
    *,
    initial: str = "wanda",
    max_cycles: int = 50,
    update_threshold: float = 0.1,
    reference_tokens: float | None = None,
    var_power: float = 1.0,
    same_sign: bool | None = None,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight, mask): initial mask (`wanda`, `magnitude`, or `obs` saliency from the
    Hessian, which `stats` must then hold), refined by DSnoT. `max_cycles=0` keeps the initial
    mask (what the official code does for skipped layers)."""
    if initial not in INITIAL_METHODS:
        raise ValueError(f"initial={initial!r}; use one of {INITIAL_METHODS}")
    norms = stats.column_sq_norms()
    wanda = wanda_scores(weight, norms)
    if initial == "wanda":
        initial_scores = wanda
    elif initial == "magnitude":
        initial_scores = weight.abs().to(torch.float32)
    else:
        hessian = stats.hessian_matrix().to(weight.device)
        initial_scores = obs_saliency(weight, hessian, percdamp).to(torch.float32)
    mask = mask_for(initial_scores, pattern, group="row")
    threshold = update_threshold
    if reference_tokens is not None:
        threshold = update_threshold * stats.tokens_per_sample / reference_tokens
    mask = dsnot_refine(
        weight,
        mask,
        stats.column_sum_per_sample(),
        stats.column_variance(),
        initial_scores if isinstance(pattern, NM) else wanda,
        pattern,
        max_cycles=max_cycles,
        update_threshold=threshold,
        var_power=var_power,
        same_sign=same_sign,
    )
    return weight.masked_fill(mask, 0), mask
