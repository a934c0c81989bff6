"""Data-aware low rank of one linear: W (out x in) replaced by B A of rank r minimising the
timestep-weighted output error sum_t alpha_t ||(W - B A) x_t||^2 = tr((W - BA) H (W - BA)^T),
H = sum_t alpha_t x_t x_t^T the input's weighted second moment (`InputStatistics`' Hessian, up
to its constant factor, which changes neither the factors nor the energy shares).

With H = S S^T (S = Q diag(sqrt(lambda)) from its eigendecomposition), the error is
||W S - B A S||_F^2, and by Eckart-Young the best rank-r approximation of W S is U_r U_r^T W S,
U_r the r leading left singular vectors of W S. So B = U_r, A = U_r^T W is optimal, and the
error left is the sum of the squared singular values after the r-th.

The whitened-SVD form ("factor H = L L^T, SVD of W L, keep r, map back through L^-1") gives the
same product when H is invertible; mapping back needs L^-1, so a rank-deficient H (a modulation
that reads the timestep alone sees as many distinct inputs as there are steps) would need
damping, which biases the result. Projecting W's outputs needs no inverse and no damping: the
eigenvalues of H below round-off are clamped to zero, and once r reaches the rank of W S the
product equals W on every input the statistics saw, up to float round-off. B A also keeps W's
action on inputs outside that span projected onto the kept output directions.

Computed in float64 (out x in is small for a modulation linear: SD3-Medium's are 9216 x 1536).
"""

from __future__ import annotations

import torch


def output_spectrum(
    weight: torch.Tensor, hessian: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, s): the left singular vectors (out, k) and singular values (k,), descending, of
    W H^(1/2): the directions of the weighted outputs and their energies' square roots. Float64."""
    w = weight.detach().to(torch.float64)  # (out, in)
    h = hessian.detach().to(torch.float64)  # (in, in)
    h = (h + h.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(h)  # ascending
    eigenvalues = eigenvalues.clamp(min=0.0)  # round-off below zero in a rank-deficient H
    root = eigenvectors * eigenvalues.sqrt()  # (in, in): H = root @ root.T
    u, s, _ = torch.linalg.svd(w @ root, full_matrices=False)  # (out, k), (k,)
    return u, s


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest r whose leading singular values keep at least `energy` of the weighted
    output energy sum s_i^2 (at least 1)."""
    squared = singular_values.to(torch.float64) ** 2
    total = float(squared.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(squared, 0) / total
    reached = torch.nonzero(kept >= energy - 1e-12)
    return int(reached[0]) + 1 if len(reached) else len(squared)


def kept_energy(singular_values: torch.Tensor, rank: int) -> float:
    """The share of the weighted output energy the leading `rank` directions keep."""
    squared = singular_values.to(torch.float64) ** 2
    total = float(squared.sum())
    return 1.0 if total == 0.0 else float(squared[:rank].sum()) / total


def low_rank_factors(
    weight: torch.Tensor, directions: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A): B = U_r (out, r), A = U_r^T W (r, in), in the weight's dtype; `directions` is
    `output_spectrum`'s U."""
    u = directions[:, :rank]  # (out, r), float64
    a = u.T @ weight.detach().to(torch.float64)  # (r, in)
    return u.to(weight.dtype), a.to(weight.dtype)
