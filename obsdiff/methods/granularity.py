"""Pruning granularity (the `granularity` config group) and the pattern it gives a sparsity."""

from __future__ import annotations

from dataclasses import dataclass

from obsdiff.pruning.patterns import NM, Pattern, Unstructured


KINDS = ("unstructured", "nm", "structured")
# The `granularity` options (conf/granularity/) of each kind: what a user types.
GRANULARITY_OPTIONS = {
    "unstructured": ("unstructured",),
    "nm": ("semi_2_4", "semi_4_8"),
    "structured": ("structured",),
}


@dataclass(frozen=True)
class Granularity:
    """`unstructured`, `nm` (with n, m) or `structured` (attention heads and FFN neurons)."""

    name: str
    kind: str
    n: int | None = None
    m: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"granularity kind {self.kind!r} is unknown; use one of {KINDS}")
        if self.kind == "nm":
            NM(self.n or 0, self.m or 0)  # validates 0 < n < m

    def pattern(self, sparsity: float) -> Pattern | None:
        """The weight pattern for `sparsity` (N:M demands sparsity = N / M); None for structured
        pruning, which removes whole heads and neurons instead (`obsdiff.structured`)."""
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity={sparsity} must lie in [0, 1)")
        if self.kind == "nm":
            assert self.n is not None and self.m is not None
            if abs(sparsity - self.n / self.m) > 1e-9:
                raise ValueError(
                    f"{self.n}:{self.m} semi-structured pruning means sparsity "
                    f"{self.n / self.m}, got sparsity={sparsity}; set sparsity={self.n / self.m}"
                )
            return NM(self.n, self.m)
        if self.kind == "structured":
            return None
        return Unstructured(sparsity)
