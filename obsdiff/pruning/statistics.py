"""Calibration statistics of one layer input, weighted by timestep (paper Eq. 5).

`InputStatistics` is fed one activation batch at a time with the current step's weight alpha_t and
holds *sums* in float32 (whatever the activation dtype), so partial statistics from several
batches or processes merge exactly by addition (`merge_`, or an all-reduce over `state_tensors`).
Modules that read the same input tensor (q/k/v of one stream) share one instance.

Offload. The sums may live on another device than the activations (`device="cpu"` beside a
pipeline on CUDA, pinned there): each batch's terms (X^T X, column sums) are computed on the
activations' device, scaled by alpha_t there, and only then moved and added. Both placements run
that same arithmetic, each step correctly rounded, so offloaded sums equal on-device sums bit
for bit (an `addmm_` would fuse the scaling into the matmul's accumulation, which a CPU sum
cannot reproduce). `to(device)` copies the sums to the device of a solve, one group at a time.

Normalisation. The Hessian is H = 2 * sum_t alpha_t X_t^T X_t / normaliser. With
`normaliser="sample"` (default, as the reference code) it divides by sum_t alpha_t * B_t, B_t being
the number of samples in the batch (the CFG-doubled batch counts both halves); with "token" it
divides by sum_t alpha_t * tokens_t. The choice only rescales H, which changes neither OBS masks
nor updates (damping is relative), but it sets the scale of reported losses.

Token weights. With `token_weights` (importance-weighted OBS, `ObsDiff.token_weighting`) each
token row x_i enters the Hessian as w_i x_i^T x_i; the weights have mean 1 over each sample's
tokens, so the counts (and the normaliser) are those of the unweighted rows, and H keeps its
scale. Only the Hessian is weighted: the moments of Wanda and DSnoT are not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


NORMALISERS = ("sample", "token")
FLOAT32_BYTES = 4
HESSIAN_PRECISIONS = ("float32", "tf32", "bfloat16")


def _xtx(rows: torch.Tensor, hessian_precision: str) -> torch.Tensor:
    """X^T X accumulated in float32: float32 inputs; TF32 tensor cores (CUDA); or bfloat16
    inputs with float32 accumulation (CUDA kernels; on the CPU the same arithmetic in float32
    on bfloat16-rounded inputs)."""
    if hessian_precision == "bfloat16":
        low = rows.to(torch.bfloat16)
        if low.is_cuda:
            return torch.mm(low.T, low, out_dtype=torch.float32)
        rows = low.to(torch.float32)
    elif hessian_precision == "tf32" and rows.is_cuda:
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return rows.T @ rows
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    return rows.T @ rows


def _accumulate(total: torch.Tensor, term: torch.Tensor, weight: float) -> None:
    """total += weight * term, the product rounded on the term's device, then moved to the
    total's (see the module docstring: offloaded and on-device sums agree bit for bit)."""
    total.add_(term.mul_(weight).to(total.device))


@dataclass
class InputStatistics:
    """Weighted sums over the rows x (length `features`) of every batch fed to `update`.

    hessian:  sum alpha x^T x                                (OBS; `features`^2 floats)
    moments:  sum alpha x, sum alpha x^2 per column, and the token-weighted sum of per-sample
              variances (Wanda and DSnoT; 3 x `features` floats)

    DSnoT's variance is that of each sample over its tokens, as the official code, which feeds
    its statistics one sample at a time; the spread between samples (prompts, timesteps, the
    two CFG halves) is not part of it.
    """

    features: int
    hessian: bool = True
    moments: bool = True
    device: torch.device | str | None = None
    hessian_precision: str = "float32"  # of X^T X: float32 | tf32 | bfloat16 (see `_xtx`)
    pin_memory: bool = False  # page-locked CPU sums (offload beside CUDA: faster copies)
    xtx: torch.Tensor | None = field(init=False, default=None)
    column_sum: torch.Tensor | None = field(init=False, default=None)
    column_sq_sum: torch.Tensor | None = field(init=False, default=None)
    variance_sum: torch.Tensor | None = field(init=False, default=None)
    # [sum alpha * samples, sum alpha * tokens, samples, tokens], float64 for exact counting
    counts: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        if self.features < 1:
            raise ValueError(f"features={self.features} must be >= 1")
        if not (self.hessian or self.moments):
            raise ValueError("InputStatistics needs hessian=True or moments=True")
        if self.hessian_precision not in HESSIAN_PRECISIONS:
            raise ValueError(
                f"hessian_precision={self.hessian_precision!r}; use one of {HESSIAN_PRECISIONS}"
            )
        for name, shape in self.sum_shapes(self.features, self.hessian, self.moments).items():
            setattr(
                self,
                name,
                torch.zeros(
                    shape, dtype=torch.float32, device=self.device, pin_memory=self.pin_memory
                ),
            )
        self.counts = torch.zeros(4, dtype=torch.float64, device=self.device)

    @staticmethod
    def sum_shapes(
        features: int, hessian: bool = True, moments: bool = True
    ) -> dict[str, tuple[int, ...]]:
        """The float32 sums an instance of these kinds keeps, by attribute name: X^T X (n, n)
        for the Hessian, three (n,) vectors for the moments."""
        n = features
        shapes: dict[str, tuple[int, ...]] = {}
        if hessian:
            shapes["xtx"] = (n, n)
        if moments:
            shapes.update(column_sum=(n,), column_sq_sum=(n,), variance_sum=(n,))
        return shapes

    @classmethod
    def sum_bytes(cls, features: int, hessian: bool = True, moments: bool = True) -> int:
        """Bytes of the float32 sums (`sum_shapes`; the few counts aside): what the memory plan
        counts per input."""
        shapes = cls.sum_shapes(features, hessian, moments).values()
        return FLOAT32_BYTES * sum(math.prod(shape) for shape in shapes)

    # ----------------------------------------------------------------- feeding
    @torch.no_grad()
    def update(
        self,
        x: torch.Tensor,
        weight: float = 1.0,
        token_scale: float = 1.0,
        token_weights: torch.Tensor | None = None,
    ) -> None:
        """Add one batch. x: (B, ..., features), B samples (a 1-D x is one sample).
        `token_scale`: x holds a sample of each sample's tokens, 1 / token_scale of them; the
        token sums (and token counts) are scaled up to estimate the whole call's, the sample
        counts are not (`obsdiff.calibration.hooks.token_sample`). `token_weights`: a
        non-negative weight w_i per token row, shaped as (or broadcastable to) x.shape[:-1]:
        row i enters X^T X as w_i x_i^T x_i (importance-weighted OBS); the counts and the
        moments (Wanda, DSnoT) are not weighted. None: every row weighs 1 (all-ones weights
        give the same bits)."""
        if x.shape[-1] != self.features:
            raise ValueError(f"input has {x.shape[-1]} features, statistics expect {self.features}")
        if weight <= 0:
            raise ValueError(f"timestep weight {weight} must be > 0")
        samples = x.shape[0] if x.dim() > 1 else 1
        rows = x.reshape(-1, self.features).to(torch.float32)  # (tokens, n)
        tokens = rows.shape[0] * token_scale
        scaled = weight * token_scale  # of the token sums
        if self.xtx is not None:
            weighted = rows
            if token_weights is not None:  # sqrt(w_i) x_i: (sqrt(w) X)^T (sqrt(w) X) = X^T W X
                root = token_weights.to(rows.device, torch.float32).expand(x.shape[:-1]).sqrt()
                weighted = rows * root.reshape(-1, 1)  # (tokens, n)
            _accumulate(self.xtx, _xtx(weighted, self.hessian_precision), scaled)  # alpha X^T W X
        if self.column_sum is not None:
            assert self.column_sq_sum is not None and self.variance_sum is not None
            _accumulate(self.column_sum, rows.sum(0), scaled)
            _accumulate(self.column_sq_sum, rows.square().sum(0), scaled)
            # population variance of each sample over its tokens, weighted by alpha * tokens
            per_sample = rows.reshape(samples, -1, self.features)  # (B, tokens / B, n)
            sample_var = torch.var(per_sample, dim=1, correction=0)  # (B, n)
            kept = per_sample.shape[1]
            if token_scale != 1.0 and kept > 1:  # k of T tokens drawn without replacement:
                whole = kept * token_scale  # E[their variance] = (k-1)/k * T/(T-1) the call's
                sample_var = sample_var * (kept / (kept - 1) * (whole - 1) / whole)
            _accumulate(self.variance_sum, sample_var.sum(0), scaled * kept)
        self.counts += torch.tensor(
            [weight * samples, weight * tokens, samples, tokens],
            dtype=torch.float64,
            device=self.counts.device,
        )

    def to(self, device: torch.device | str) -> InputStatistics:
        """These statistics with their sums on `device`: itself when they are there, else a
        copy (an offloaded group's, for its solve)."""
        if self.counts.device == torch.device(device):
            return self
        copy = InputStatistics(
            self.features, self.hessian, self.moments, "meta", self.hessian_precision
        )
        for name, tensor in self.named_state().items():
            setattr(copy, name, tensor.to(device))
        copy.device = device
        return copy

    def named_state(self) -> dict[str, torch.Tensor]:
        """Every sum this instance keeps, by attribute name (saved and loaded by name)."""
        names = ("xtx", "column_sum", "column_sq_sum", "variance_sum", "counts")
        return {name: t for name in names if (t := getattr(self, name)) is not None}

    def state_tensors(self) -> list[torch.Tensor]:
        """Every sum, for an in-place all-reduce (SUM) across data-parallel ranks."""
        return list(self.named_state().values())

    @torch.no_grad()
    def merge_(self, other: InputStatistics) -> InputStatistics:
        """Add another instance's sums (same features and kinds) into this one."""
        if (other.features, other.hessian, other.moments) != (
            self.features,
            self.hessian,
            self.moments,
        ):
            raise ValueError("can only merge statistics of the same features and kinds")
        for mine, theirs in zip(self.state_tensors(), other.state_tensors(), strict=True):
            mine.add_(theirs.to(mine.device))
        return self

    # ----------------------------------------------------------------- reading
    @property
    def num_samples(self) -> int:
        return int(self.counts[2].item())

    @property
    def num_tokens(self) -> int:
        return int(self.counts[3].item())

    def _denominator(self, normaliser: str) -> float:
        if normaliser not in NORMALISERS:
            raise ValueError(f"normaliser={normaliser!r}; use one of {NORMALISERS}")
        value = float(self.counts[0 if normaliser == "sample" else 1].item())
        if value <= 0:
            raise RuntimeError("no calibration data was recorded for this input")
        return value

    def hessian_matrix(self, normaliser: str = "sample") -> torch.Tensor:
        """H = 2 sum_t alpha_t X_t^T X_t / normaliser (Eq. 5). (n, n), float32."""
        if self.xtx is None:
            raise RuntimeError("these statistics were collected without the Hessian")
        return self.xtx * (2.0 / self._denominator(normaliser))

    def _moment(self, tensor: torch.Tensor | None) -> torch.Tensor:
        if tensor is None:
            raise RuntimeError("these statistics were collected without column moments")
        return tensor

    def column_sq_norms(self) -> torch.Tensor:
        """Wanda's ||X_j||^2: weighted mean over samples of the per-column squared norm. (n,)"""
        return self._moment(self.column_sq_sum) / self._denominator("sample")

    def column_sum_per_sample(self) -> torch.Tensor:
        """DSnoT's signed statistic: weighted mean over samples of sum_tokens x_j. (n,)"""
        return self._moment(self.column_sum) / self._denominator("sample")

    def column_mean(self) -> torch.Tensor:
        """Weighted mean of x_j per token. (n,)"""
        return self._moment(self.column_sum) / self._denominator("token")

    def column_variance(self) -> torch.Tensor:
        """DSnoT's variance: token-weighted mean of the per-sample variances. (n,)"""
        return self._moment(self.variance_sum) / self._denominator("token")

    @property
    def tokens_per_sample(self) -> float:
        """Average tokens per sample (weighted), to normalise token-count-dependent thresholds."""
        return self._denominator("token") / self._denominator("sample")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_tensors())
