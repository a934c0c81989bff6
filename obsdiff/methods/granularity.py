"""Pruning granularity (the `granularity` config group) and the target it gives a sparsity."""

from __future__ import annotations

import re
from dataclasses import dataclass

from obsdiff.methods.package import Depth, Structured, Target
from obsdiff.pruning.patterns import NM, Unstructured, check_sparsity


KINDS = ("unstructured", "nm", "structured", "depth")
# The `granularity` options (conf/granularity/) of each kind: what a user types.
GRANULARITY_OPTIONS = {
    "unstructured": ("unstructured",),
    "nm": ("semi_2_4", "semi_4_8"),
    "structured": ("structured",),
    "depth": ("depth",),
}


@dataclass(frozen=True)
class Granularity:
    """`unstructured`, `nm` (with n, m), `structured` (attention heads and FFN neurons) or
    `depth` (whole blocks)."""

    name: str
    kind: str
    n: int | None = None
    m: int | None = None
    align: int | None = None  # structured: the widths left are multiples of it

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"granularity kind {self.kind!r} is unknown; use one of {KINDS}")
        if self.align is not None and self.kind != "structured":
            raise ValueError(
                f"granularity.align={self.align} applies to granularity=structured only; "
                "leave it unset"
            )
        if self.align is not None and self.align < 1:
            raise ValueError(f"granularity.align={self.align} must be >= 1; e.g. 64")
        if self.kind == "nm":
            NM(self.n or 0, self.m or 0)  # validates 0 < n < m

    @classmethod
    def from_name(cls, name: str, align: int | None = None) -> Granularity:
        """`unstructured`, `structured`, `depth` or `semi_<n>_<m>` (e.g. semi_2_4): the option
        names of conf/granularity/; `align` (structured): the widths left are multiples of
        it, e.g. 64 or 128 (the fast kernels' tiles)."""
        options = "unstructured, semi_2_4, semi_4_8 (or semi_<n>_<m>), structured, depth"
        nm = re.fullmatch(r"semi_(\d+)_(\d+)", name)
        try:
            if nm:
                return cls(name, "nm", int(nm.group(1)), int(nm.group(2)), align)
            if name in ("unstructured", "structured", "depth"):
                return cls(name, name, align=align)
        except ValueError as err:
            raise ValueError(f"granularity={name!r}: {err}; use one of {options}") from None
        raise ValueError(f"granularity={name!r}; use one of {options}")

    def target(self, sparsity: float) -> Target:
        """What a method prunes towards at `sparsity`: a weight pattern (N:M demands sparsity =
        N / M), or `Structured`, whole heads and neurons (`obsdiff.methods.structured`)."""
        check_sparsity(sparsity)
        if self.kind == "nm":
            assert self.n is not None and self.m is not None
            if abs(sparsity - self.n / self.m) > 1e-9:
                raise ValueError(
                    f"{self.n}:{self.m} semi-structured pruning means sparsity "
                    f"{self.n / self.m}, got sparsity={sparsity}; set sparsity={self.n / self.m}"
                )
            return NM(self.n, self.m)
        if self.kind == "structured":
            return Structured(sparsity, self.align)
        if self.kind == "depth":
            return Depth(sparsity)
        return Unstructured(sparsity)
