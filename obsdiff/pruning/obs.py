"""OBS pruning, unstructured and N:M: SparseGPT-style lazy-batch blocked OBS (Sec. 4.3, Eq. 1-2).

For a layer y = W x with Hessian H = 2 X X^T (Eq. 2, here the timestep-weighted H of Eq. 5),
removing weight q of a row costs L_q = w_q^2 / (2 [H^-1]_qq) and the optimal compensation of the
remaining weights is dw = -(w_q / [H^-1]_qq) H^-1_{:,q}. Columns are processed left to right; the
H^-1 information of the columns still to come is read off U, the upper Cholesky factor of H^-1
(U^T U = H^-1): diag(U)_q^2 is [H^-1]_qq restricted to columns >= q, and row q of U carries the
update. Within a block of `blocksize` columns updates are applied column by column (in sub-blocks
joined by matmuls, see `_solve`); the block's accumulated error is pushed to all later columns
with one matmul ("lazy batch").

Masks: unstructured selects, per block, the exact share of each layer's weights with the lowest
w^2 / diag(U)^2 (the reference code's adaptive mask; exact counts per block and per layer);
N:M selects, at every group of M columns, the N lowest per row using the weights updated so far.

Damping matters beyond numerical safety: the left-to-right compensation is greedy (a column's
update also moves later columns that will be pruned), and with percdamp = 0 on an ill-conditioned
H it can end worse than plain zeroing for a given mask; the default 1% damping was not seen to.

Speed: problems (one Hessian with the layers that read its input) are solved together. Layers
sharing a Hessian are stacked along rows (one factorisation, one column loop); Hessians of equal
size with equal stacked row counts run through one batched loop, which amortises the per-column
interpreter and kernel-launch overhead that dominates layers of up to ~2k columns. A batch holds
at most `batch_bytes` of solve workspace (`obs_workspace_bytes`; at least one problem): wide
layers gain nothing from batching and would multiply the solve's memory. `obs_batches` is that
partition, a function of the shapes alone: the package solve and the sharded solve cut the same
batches, so each problem meets the same arithmetic whichever process solves it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from obsdiff.pruning.patterns import NM, Pattern, lowest_k_mask, num_to_prune


log = logging.getLogger(__name__)

INNER_BLOCK = 16  # columns per sub-block of the column loop (see `_solve`)


class HessianFactorizationError(RuntimeError):
    """H stayed indefinite after every damping escalation."""


@dataclass
class ObsResult:
    """One pruned layer: new weight (input dtype), mask (True = pruned) and the OBS loss estimate
    sum over pruned weights of (w - q)^2 / (2 diag(U)^2), i.e. the predicted increase of the
    layer-wise objective in units of H."""

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float


# --------------------------------------------------------------------------- Hessian preparation
def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64 (tests, checks), else float32 (the reference's choice)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def prepare_hessian(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy of H with dead inputs (H_jj = 0) set to 1 and percdamp * mean(diag H) added to the
    diagonal; returns (H, dead). The weights of dead inputs must be zeroed by the caller."""
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"Hessian must be square, got shape {tuple(hessian.shape)}")
    if percdamp < 0:
        raise ValueError(f"percdamp={percdamp} must be >= 0")
    H = hessian.clone()
    dead = torch.diagonal(H) == 0  # (n,)
    H[dead, dead] = 1.0
    damp = percdamp * torch.diagonal(H).mean()
    H.diagonal().add_(damp)
    return H, dead


def damped_cholesky(
    H: torch.Tensor, max_escalations: int = 6, factor: float = 10.0
) -> torch.Tensor:
    """Lower Cholesky factor of H; on failure add escalating damping (logged), never skip it.

    The first extra damping is 1e-6 * mean(diag H), multiplied by `factor` on each retry.
    Raises HessianFactorizationError when H is still not positive definite.
    """
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        return L
    scale = torch.diagonal(H).mean().abs().clamp_min(torch.finfo(H.dtype).tiny)
    extra = 1e-6 * scale
    for attempt in range(1, max_escalations + 1):
        log.warning(
            "Cholesky of a %dx%d Hessian failed; retrying with extra damping %.3g (attempt %d/%d)",
            H.shape[0],
            H.shape[0],
            float(extra),
            attempt,
            max_escalations,
        )
        L, info = torch.linalg.cholesky_ex(
            H + extra * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        )
        if int(info) == 0:
            return L
        extra = extra * factor
    raise HessianFactorizationError(
        f"the {H.shape[0]}x{H.shape[0]} Hessian is not positive definite even with extra damping "
        f"{float(extra / factor):.3g}; use more calibration data or a larger percdamp"
    )


def triangular_inverse(L: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """Inverse of a lower triangular L by recursive halving: [[A, 0], [B, C]]^-1 =
    [[A^-1, 0], [-C^-1 B A^-1, C^-1]], two matmuls a level (about 2/3 n^3 flops, matmul speed),
    instead of a triangular solve against the identity (n^3 flops)."""
    n = L.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=L.dtype, device=L.device)
        return torch.linalg.solve_triangular(L, eye, upper=False)
    h = n // 2
    A_inv = triangular_inverse(L[:h, :h], leaf)  # (h, h)
    C_inv = triangular_inverse(L[h:, h:], leaf)  # (n - h, n - h)
    inverse = torch.zeros_like(L)
    inverse[:h, :h] = A_inv
    inverse[h:, h:] = C_inv
    inverse[h:, :h] = -(C_inv @ (L[h:, :h] @ A_inv))
    return inverse


def inverse_cholesky_upper(H: torch.Tensor, **escalation: float) -> torch.Tensor:
    """U upper triangular with U^T U = H^-1, from one factorisation and one triangular inverse.

    With P the reversal permutation and L the lower Cholesky factor of P H P, H^-1 = U^T U for
    U = P L^-1 P, which is upper triangular with a positive diagonal: the same factor the
    reference chain cholesky -> cholesky_inverse -> cholesky(upper) produces, at about half the
    cost and with one factorisation that can fail instead of two.
    """
    flipped = H.flip(0, 1)  # P H P
    L = damped_cholesky(flipped, **escalation)  # type: ignore[arg-type]
    return triangular_inverse(L).flip(0, 1)  # P L^-1 P, (n, n) upper


def obs_saliency(
    weight: torch.Tensor, hessian: torch.Tensor, percdamp: float = 0.01
) -> torch.Tensor:
    """w^2 / diag(U)^2 for every weight (the mask criterion of the first block; Eq. 2 up to 1/2)."""
    dtype = compute_dtype(weight, hessian)
    H, dead = prepare_hessian(hessian.to(dtype), percdamp)
    W = weight.to(dtype).clone()
    W[:, dead] = 0
    U = inverse_cholesky_upper(H)
    return W.square() / torch.diagonal(U).square().unsqueeze(0)


# --------------------------------------------------------------------------- the solver
@dataclass
class _Batch:
    """G problems of equal size: stacked weights (G, R, n), factors (G, n, n), row segments."""

    weights: torch.Tensor
    factors: torch.Tensor
    segments: list[list[tuple[int, int]]]  # per problem: (start, stop) rows of each layer
    fixed_masks: torch.Tensor | None


def _select_block(
    Wt1: torch.Tensor,
    d: torch.Tensor,
    segments: list[list[tuple[int, int]]],
    sparsity: float,
    i1: int,
    i2: int,
) -> torch.Tensor:
    """Unstructured mask of columns [i1, i2), columns first (G, c, R): per layer, the share of
    the block that keeps the layer's running count at floor(sparsity * weights seen so far),
    lowest w^2 / d^2 first."""
    scores = Wt1.square() / d.square().unsqueeze(2)  # (G, c, R)
    mask = torch.zeros_like(Wt1, dtype=torch.bool)
    for g, layer_rows in enumerate(segments):
        for start, stop in layer_rows:
            rows = stop - start
            k = num_to_prune(rows * i2, sparsity) - num_to_prune(rows * i1, sparsity)
            block = scores[g, :, start:stop].T.reshape(1, -1)  # row-major order, as the reference
            mask[g, :, start:stop] = lowest_k_mask(block, k).reshape(rows, -1).T
    return mask


def _nm_select(Wt1: torch.Tensor, d: torch.Tensor, i: int, pattern: NM) -> torch.Tensor:
    """N:M mask of columns [i, i + M) from the current weights, columns first. (G, M, R)"""
    scores = Wt1[:, i : i + pattern.m].square() / d[:, i : i + pattern.m, None].square()
    return lowest_k_mask(scores.transpose(1, 2), pattern.n).transpose(1, 2)


@torch.no_grad()
def _solve(
    batch: _Batch, pattern: Pattern, blocksize: int, compensate: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocked OBS on a batch: (weights (G, R, n), masks (G, R, n), per-row losses (G, R)).

    Works on the transposed weights (G, n, R), so that a column is contiguous. Two levels of
    lazy updates: rank-1 updates only inside sub-blocks of `INNER_BLOCK` columns (a multiple of
    M), matmuls between sub-blocks and between blocks: the arithmetic of the column-by-column
    loop at a fraction of its memory traffic.
    """
    Wt = batch.weights.transpose(1, 2).contiguous()  # (G, n, R)
    U = batch.factors  # (G, n, n) upper
    fixed = None if batch.fixed_masks is None else batch.fixed_masks.transpose(1, 2)  # (G, n, R)
    G, n, R = Wt.shape
    nm = pattern if isinstance(pattern, NM) else None
    inner = INNER_BLOCK if nm is None else nm.m * -(-INNER_BLOCK // nm.m)
    mask = torch.zeros_like(Wt, dtype=torch.bool)
    losses = torch.zeros(G, R, dtype=Wt.dtype, device=Wt.device)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        c = i2 - i1
        Wt1 = Wt[:, i1:i2].clone()  # (G, c, R)
        U1 = U[:, i1:i2, i1:i2]  # (G, c, c)
        d = torch.diagonal(U1, dim1=-2, dim2=-1)  # (G, c)
        if fixed is not None:
            M1 = fixed[:, i1:i2].clone()
        elif nm is None:
            M1 = _select_block(Wt1, d, batch.segments, pattern.sparsity, i1, i2)
        else:
            M1 = torch.zeros_like(Wt1, dtype=torch.bool)
        select_nm = nm is not None and fixed is None
        Err1 = torch.zeros_like(Wt1)  # (G, c, R): (w - q) / d per column
        if not compensate:
            if select_nm:
                for i in range(0, c, nm.m):  # type: ignore[union-attr]
                    M1[:, i : i + nm.m] = _nm_select(Wt1, d, i, nm)  # type: ignore[union-attr, arg-type]
            Err1 = Wt1 * M1 / d.unsqueeze(2)
        else:
            for j1 in range(0, c, inner):
                j2 = min(j1 + inner, c)
                for i in range(j1, j2):
                    if select_nm and i % nm.m == 0:  # type: ignore[union-attr]
                        M1[:, i : i + nm.m] = _nm_select(Wt1, d, i, nm)  # type: ignore[union-attr, arg-type]
                    err = Wt1[:, i] * M1[:, i] / d[:, i, None]  # (w - q) / d    (G, R)
                    Wt1[:, i:j2] -= U1[:, i, i:j2, None] * err[:, None]  # Eq. 2 update, local
                    Err1[:, i] = err
                if j2 < c:  # the sub-block's error reaches the rest of the block in one matmul
                    Wt1[:, j2:] -= torch.bmm(U1[:, j1:j2, j2:].transpose(1, 2), Err1[:, j1:j2])
            if i2 < n:  # lazy update of all later columns
                Wt[:, i2:] -= torch.bmm(U[:, i1:i2, i2:].transpose(1, 2), Err1)
        losses += Err1.square().sum(1) / 2
        Wt[:, i1:i2] = Wt1.masked_fill(M1, 0)
        mask[:, i1:i2] = M1
    return Wt.transpose(1, 2), mask.transpose(1, 2), losses


@dataclass
class ObsProblem:
    """One Hessian and the layers (weights (rows_k, n)) that read its input; optional fixed masks
    (True = prune) replace mask selection, e.g. to compensate a mask chosen elsewhere."""

    hessian: torch.Tensor
    weights: Sequence[torch.Tensor]
    masks: Sequence[torch.Tensor] | None = None


def obs_workspace_bytes(columns: int, rows: int, itemsize: int = 4) -> int:
    """Memory of one problem's solve (`columns` inputs, `rows` stacked outputs): its Hessian's
    copy, inverse factor and the batch's stacked factor (3 n^2), and the stacked, transposed
    and updated weights (3 rows x n)."""
    return itemsize * (3 * columns * columns + 3 * rows * columns)


def obs_batches(
    shapes: Sequence[tuple[int, int]], batch_bytes: float | None = None, itemsize: int = 4
) -> list[list[int]]:
    """The batches problems of (columns, rows) `shapes` are solved in: equal shapes together,
    in order of first appearance, each batch at most `batch_bytes` of workspace (None: no
    limit), at least one problem."""
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, shape in enumerate(shapes):
        by_shape[shape].append(index)
    batches = []
    for (columns, rows), members in by_shape.items():
        size = obs_workspace_bytes(columns, rows, itemsize)
        per_batch = len(members) if batch_bytes is None else max(1, int(batch_bytes // size))
        batches += [members[i : i + per_batch] for i in range(0, len(members), per_batch)]
    return batches


def obs_prune_problems(
    problems: Sequence[ObsProblem],
    pattern: Pattern,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    compensate: bool = True,
    batch_bytes: float | None = None,
) -> list[list[ObsResult]]:
    """Prune every layer of every problem; result[p][k] is layer k of problem p.

    Every layer gets its own exact sparsity (per layer and per column block for unstructured,
    per group of M for N:M). `compensate=False` keeps the OBS mask selection and skips the weight
    updates (the mask then comes from the unmodified weights). Problems of equal size are solved
    in batches of at most `batch_bytes` of workspace (`obs_batches`; None: no limit).
    """
    if blocksize < 1:
        raise ValueError(f"blocksize={blocksize} must be >= 1")
    if isinstance(pattern, NM) and blocksize % pattern.m:
        raise ValueError(f"blocksize={blocksize} must be a multiple of M={pattern.m}")
    groups: dict[tuple, list[int]] = defaultdict(list)
    for p, problem in enumerate(problems):
        n = problem.hessian.shape[0]
        for w in problem.weights:
            if w.dim() != 2 or w.shape[1] != n:
                raise ValueError(f"weight {tuple(w.shape)} does not match a {n}x{n} Hessian")
            if isinstance(pattern, NM):
                pattern.check_columns(n)
        rows = sum(w.shape[0] for w in problem.weights)
        dtype = compute_dtype(problem.hessian, *problem.weights)
        fixed = problem.masks is not None
        groups[(n, rows, dtype, str(problem.hessian.device), fixed)].append(p)

    results: list[list[ObsResult]] = [[] for _ in problems]
    for (n, rows, dtype, _, _), same in groups.items():
        itemsize = torch.finfo(dtype).bits // 8
        for batch_members in obs_batches([(n, rows)] * len(same), batch_bytes, itemsize):
            _solve_batch(
                problems,
                [same[i] for i in batch_members],
                pattern,
                dtype,
                results,
                blocksize=blocksize,
                percdamp=percdamp,
                compensate=compensate,
            )
    return results


def _solve_batch(
    problems: Sequence[ObsProblem],
    members: list[int],
    pattern: Pattern,
    dtype: torch.dtype,
    results: list[list[ObsResult]],
    *,
    blocksize: int,
    percdamp: float,
    compensate: bool,
) -> None:
    """Solve problems `members` (equal size) in one batch; their results go into `results`."""
    batch = _make_batch([problems[p] for p in members], dtype, percdamp)
    W, M, losses = _solve(batch, pattern, blocksize, compensate)
    for g, p in enumerate(members):
        for k, (start, stop) in enumerate(batch.segments[g]):
            original = problems[p].weights[k]
            results[p].append(
                ObsResult(
                    weight=W[g, start:stop].to(original.dtype),
                    mask=M[g, start:stop].clone(),
                    loss=float(losses[g, start:stop].sum()),
                )
            )


def _make_batch(problems: list[ObsProblem], dtype: torch.dtype, percdamp: float) -> _Batch:
    weights, factors, segments, masks = [], [], [], []
    for problem in problems:
        H, dead = prepare_hessian(problem.hessian.to(dtype), percdamp)
        stacked = torch.cat([w.to(dtype) for w in problem.weights], dim=0)  # (R, n)
        stacked[:, dead] = 0
        weights.append(stacked)
        factors.append(inverse_cholesky_upper(H))
        bounds, start = [], 0
        for w in problem.weights:
            bounds.append((start, start + w.shape[0]))
            start += w.shape[0]
        segments.append(bounds)
        if problem.masks is not None:
            masks.append(torch.cat([m.to(torch.bool) for m in problem.masks], dim=0))
    return _Batch(
        weights=torch.stack(weights),
        factors=torch.stack(factors),
        segments=segments,
        fixed_masks=torch.stack(masks) if masks else None,
    )


def obs_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    compensate: bool = True,
    mask: torch.Tensor | None = None,
) -> ObsResult:
    """Prune one layer (weight (rows, n), Hessian (n, n)); see `obs_prune_problems`."""
    problem = ObsProblem(hessian, [weight], None if mask is None else [mask])
    return obs_prune_problems(
        [problem], pattern, blocksize=blocksize, percdamp=percdamp, compensate=compensate
    )[0][0]
