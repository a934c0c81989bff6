"""Structured OBS: FFN neurons (paper Eq. 6) and attention heads (Eq. 7, 8).

Both remove input columns of a consumer layer (the FFN down-projection; the attention output
projections) and compensate the remaining columns. For a set Q of columns removed jointly, the
optimal update of the layer-wise objective is

    dW_R = -W_Q [H^-1]_QQ^-1 [H^-1]_QR,     W_Q = 0,

which for one column is Eq. 6: dW = -(W_{:,q} / [H^-1]_qq) H^-1_{q,:}. Choices are conditioned on
earlier removals: between chunks H^-1 is recomputed on the remaining columns (the reference code
zeroes the removed rows and columns of H, puts 1 on their diagonal and re-inverts, which is the
same). Damping is added once, before the first inversion, as in the reference code.

The kernels return the new weights and the removed indices; physically shrinking the producer
layers (up-projections, q/k/v) is the job of the model surgery.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from obsdiff.pruning.obs import compute_dtype, damped_cholesky, prepare_hessian
from obsdiff.pruning.patterns import check_sparsity


HEAD_SALIENCIES = ("reference", "eq7", "exact")


def structured_count(total: int, sparsity: float) -> int:
    """Units to remove: Python's round(total * sparsity), half to even, as the reference code.

    Only this rounding reproduces the paper's parameter counts (e.g. SD3.5-Large at 25%:
    round(38 * 0.25) = round(9.5) = 10 heads).
    """
    check_sparsity(sparsity)
    return round(total * sparsity)


def aligned_count(total: int, sparsity: float, unit_width: int, align: int | None) -> int:
    """Units to remove so that the units left span a multiple of `align` channels (each unit
    `unit_width` wide: a head's dimension, or 1 for a neuron): the number left is the multiple
    of align / gcd(align, unit_width) nearest to what `structured_count` leaves (a tie keeps the
    more), at least one such multiple. None: `structured_count` itself. ValueError when not even
    one multiple fits in `total`."""
    removed = structured_count(total, sparsity)
    if align is None:
        return removed
    step = align // math.gcd(align, unit_width)  # units whose width is a multiple of align
    if step > total:
        raise ValueError(
            f"granularity.align={align}: {total} units of width {unit_width} cannot leave a "
            f"multiple of {align} channels; use a smaller align (at most {total * unit_width})"
        )
    left = total - removed
    below = max(step, left // step * step)
    above = min(total // step * step, below + step)
    return total - (above if above - left <= left - below else below)


def reference_chunk_sizes(target: int) -> list[int]:
    """The reference code's FFN chunk schedule: (target - 512) // 2 columns clamped to [64, 1024],
    then (previous - 512) // 2 clamped likewise, until `target` columns are removed."""
    sizes, removed, blocksize = [], 0, (target - 512) // 2
    while removed < target:
        count = min(target - removed, max(blocksize, 64), 1024)
        sizes.append(count)
        removed += count
        blocksize = (blocksize - 512) // 2
    return sizes


def _inverse(H: torch.Tensor) -> torch.Tensor:
    """H^-1 through a (damping-escalating) Cholesky factorisation."""
    return torch.cholesky_inverse(damped_cholesky(H))


def _remove_columns(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    remaining: torch.Tensor,
    chosen: torch.Tensor,
    compensate: bool,
) -> None:
    """Joint OBS removal of columns `chosen` (indices into `remaining`), in place on W.

    W: (rows, n) full width; Hinv: inverse of H restricted to `remaining` (|R| x |R|).
    """
    columns = remaining[chosen]  # absolute indices
    if compensate:
        Hinv_QQ = Hinv[chosen][:, chosen]  # (q, q)
        Hinv_QR = Hinv[chosen]  # (q, |R|)
        correction = torch.linalg.solve(Hinv_QQ, Hinv_QR)  # (q, |R|)
        W[:, remaining] -= W[:, columns] @ correction  # (rows, |R|)
    W[:, columns] = 0


@dataclass
class StructuredResult:
    """New weights (input dtype, same shape; removed columns are zero) and removed units."""

    weights: list[torch.Tensor]
    removed: torch.Tensor  # sorted indices of removed units (columns for neurons, heads for heads)


@torch.no_grad()
def obs_prune_neurons(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    count: int,
    *,
    percdamp: float = 0.01,
    chunk_sizes: Sequence[int] | None = None,
    compensate: bool = True,
) -> StructuredResult:
    """Remove `count` input columns (FFN neurons) of a down-projection weight (rows, n) (Eq. 6).

    Saliency of column q: sum_rows W_{:,q}^2 / [H^-1]_qq on the remaining columns. Columns go
    in chunks (`chunk_sizes`, default the reference schedule; all ones is exact greedy OBS), each
    chunk removed jointly with the optimal update, then H^-1 is recomputed.
    `compensate=False` keeps the selection procedure and leaves the other weights unchanged.
    """
    n = hessian.shape[0]
    if weight.dim() != 2 or weight.shape[1] != n:
        raise ValueError(f"weight {tuple(weight.shape)} does not match a {n}x{n} Hessian")
    if not 0 <= count < n:
        raise ValueError(f"cannot remove {count} of {n} columns")
    sizes = list(chunk_sizes) if chunk_sizes is not None else reference_chunk_sizes(count)
    if sum(sizes) != count or any(s < 1 for s in sizes):
        raise ValueError(f"chunk sizes {sizes} must be positive and sum to {count}")
    dtype = compute_dtype(weight, hessian)
    H, dead = prepare_hessian(hessian.to(dtype), percdamp)
    W = weight.to(dtype).clone()
    W[:, dead] = 0
    removed = torch.zeros(n, dtype=torch.bool, device=W.device)
    for size in sizes:
        remaining = torch.nonzero(~removed).squeeze(1)  # (|R|,)
        Hinv = _inverse(H[remaining][:, remaining])  # (|R|, |R|)
        saliency = W[:, remaining].square().sum(0) / torch.diagonal(Hinv)  # Eq. 6, (|R|,)
        chosen = torch.sort(saliency, stable=True).indices[:size]
        _remove_columns(W, Hinv, remaining, chosen, compensate)
        removed[remaining[chosen]] = True
    return StructuredResult([W.to(weight.dtype)], torch.nonzero(removed).squeeze(1))


def head_saliency(
    W: torch.Tensor, Hinv: torch.Tensor, head_dim: int, kind: str = "reference"
) -> torch.Tensor:
    """Error of removing each head (columns [j d, (j+1) d)) of W (rows, heads * d). (heads,)

    eq7:        sum_k ||W_{:,k}||^2 / [H_j^-1]_kk  (Eq. 7 as printed)
    reference:  the reference code's conditional form, [H_j^-1]_kk replaced by the squared
                diagonal of the lower Cholesky factor of the head's diagonal block H_j^-1
    exact:      trace(W_j [H_j^-1]^-1 W_j^T), the exact joint OBS error of removing the head
    """
    if kind not in HEAD_SALIENCIES:
        raise ValueError(f"head saliency {kind!r}; use one of {HEAD_SALIENCIES}")
    heads = W.shape[1] // head_dim
    blocks = torch.stack(
        [
            Hinv[j * head_dim : (j + 1) * head_dim, j * head_dim : (j + 1) * head_dim]
            for j in range(heads)
        ]
    )  # (heads, d, d)
    W_heads = W.reshape(W.shape[0], heads, head_dim).transpose(0, 1)  # (heads, rows, d)
    if kind == "exact":
        solved = torch.linalg.solve(blocks, W_heads.transpose(1, 2))  # (heads, d, rows)
        return (W_heads.transpose(1, 2) * solved).sum((1, 2))
    if kind == "eq7":
        denominator = torch.diagonal(blocks, dim1=-2, dim2=-1)  # (heads, d)
    else:
        denominator = torch.diagonal(torch.linalg.cholesky(blocks), dim1=-2, dim2=-1).square()
    return (W_heads.square().sum(1) / denominator).sum(1)


def reciprocal_rank_fusion(errors: Sequence[torch.Tensor], k: float = 60.0) -> torch.Tensor:
    """Eq. 8: S_j = sum_s 1 / (k + rank_s(j)), rank 1 = lowest error in stream s. (units,)

    The unit with the highest fused score is the one to prune (`rrf_choice` breaks ties).
    """
    fused = torch.zeros_like(errors[0], dtype=torch.float64)
    for error in errors:
        order = torch.sort(error, stable=True).indices
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(1, len(order) + 1, device=order.device)
        fused += 1.0 / (k + ranks.to(torch.float64))
    return fused


def rrf_choice(errors: Sequence[torch.Tensor], k: float = 60.0) -> int:
    """The unit to prune: the highest fused score (Eq. 8); among tied units, the one ranked
    better by the first stream (MMDiT: `to_out.0`, the image tokens).

    This is the reference code's rule: it fuses the rankings in a dict filled in the first
    stream's order and takes the first maximum of a stable sort. Exact ties are common with two
    streams: a unit ranked (1, 2) and one ranked (2, 1) score the same float sum."""
    fused = reciprocal_rank_fusion(errors, k)
    first_order = torch.sort(errors[0], stable=True).indices  # (units,), best first
    return int(first_order[torch.argmax(fused[first_order])])  # argmax: the first maximum


@torch.no_grad()
def obs_prune_heads(
    weights: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor],
    head_dim: int,
    count: int,
    *,
    percdamp: float = 0.01,
    rrf_k: float = 60.0,
    saliency: str = "reference",
    compensate: bool = True,
) -> StructuredResult:
    """Remove `count` heads from one or more output projections that share the heads (Eq. 7, 8).

    weights[s]: (rows_s, heads * head_dim) output projection of stream s (MMDiT: `to_out.0` for
    image tokens, `to_add_out` for text tokens), hessians[s] its input Hessian. One head per
    iteration: each stream ranks the remaining heads by saliency, the rankings are fused by
    reciprocal rank fusion (k = `rrf_k`; a tie goes to the head the first stream ranks better),
    the best head is removed from every stream with its own OBS compensation, and H^-1 is
    recomputed. With one stream the fusion is that stream's order.
    """
    if len(weights) != len(hessians) or not weights:
        raise ValueError("give one Hessian per output projection (at least one)")
    n = hessians[0].shape[0]
    if n % head_dim:
        raise ValueError(f"{n} input columns are not a whole number of heads of size {head_dim}")
    heads = n // head_dim
    if not 0 <= count < heads:
        raise ValueError(f"cannot remove {count} of {heads} heads")
    dtype = compute_dtype(*weights, *hessians)
    Ws, Hs = [], []
    for W, H in zip(weights, hessians, strict=True):
        if H.shape != (n, n) or W.shape[1] != n:
            raise ValueError("every stream needs the same head layout (heads * head_dim inputs)")
        H_prepared, dead = prepare_hessian(H.to(dtype), percdamp)
        W_prepared = W.to(dtype).clone()
        W_prepared[:, dead] = 0
        Ws.append(W_prepared)
        Hs.append(H_prepared)
    removed_heads = torch.zeros(heads, dtype=torch.bool)
    for _ in range(count):
        alive = torch.nonzero(~removed_heads).squeeze(1)  # (h,)
        remaining = (alive.unsqueeze(1) * head_dim + torch.arange(head_dim)).reshape(-1)  # (h d,)
        remaining = remaining.to(Ws[0].device)
        inverses = [_inverse(H[remaining][:, remaining]) for H in Hs]
        errors = [
            head_saliency(W[:, remaining], Hinv, head_dim, saliency)
            for W, Hinv in zip(Ws, inverses, strict=True)
        ]
        best = rrf_choice(errors, rrf_k)  # index among the alive heads
        chosen = torch.arange(best * head_dim, (best + 1) * head_dim, device=remaining.device)
        for W, Hinv in zip(Ws, inverses, strict=True):
            _remove_columns(W, Hinv, remaining, chosen, compensate)
        removed_heads[alive[best]] = True
    return StructuredResult(
        [W.to(orig.dtype) for W, orig in zip(Ws, weights, strict=True)],
        torch.nonzero(removed_heads).squeeze(1),
    )
