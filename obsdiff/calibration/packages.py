"""Module packages (paper Sec. 4.2): basic units listed block by block, cut into K contiguous
packages of near-equal size (the first `len % K` packages get one unit more), each package
calibrated in its own pass over the calibration set."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from obsdiff.models.base import ModelAdapter
from obsdiff.models.structure import Unit


@dataclass(frozen=True)
class UnitRef:
    """One basic unit of one block: its input groups with names relative to the block."""

    block_index: int
    block_name: str
    groups: Unit

    @property
    def module_names(self) -> list[str]:
        return [f"{self.block_name}.{name}" for group in self.groups for name in group]


def list_units(
    adapter: ModelAdapter,
    denoiser: nn.Module,
    block_range: tuple[int, int] | None = None,
    structured: bool = False,
) -> list[UnitRef]:
    """Every basic unit of the blocks in [start, end), block by block, in forward order; for
    structured pruning the units are the consumers of heads and neurons (output projections,
    down-projections). Without a range, the adapter's default for the granularity."""
    blocks = adapter.blocks(denoiser)
    if block_range is None:
        block_range = adapter.default_blocks(len(blocks), structured)
    start, end = block_range
    if not 0 <= start < end <= len(blocks):
        raise ValueError(
            f"blocks=[{start},{end}) is outside the model's {len(blocks)} blocks; use 0 <= start "
            f"< end <= {len(blocks)}"
        )
    units: list[UnitRef] = []
    for index in range(start, end):
        name, block = blocks[index]
        if structured:
            adapter.check_structured(name, block)
        block_units = adapter.structured_units(block) if structured else adapter.block_units(block)
        if not block_units:
            raise ValueError(
                f"block {name} has none of the {adapter.family} target linears; is this model "
                f"config of the right family?"
            )
        refs = [UnitRef(index, name, unit) for unit in block_units]
        kept_out = [n for ref in refs for n in ref.module_names if adapter.is_kept_out(n)]
        if kept_out:  # a target table that reaches into the do-not-compress list
            raise ValueError(
                f"{kept_out[0]} is a {adapter.family} pruning target and on its do-not-compress "
                "list (ModelAdapter.do_not_compress): the family's tables disagree"
            )
        units.extend(refs)
    return units


def split_packages(units: list[UnitRef], num_packages: int) -> list[list[UnitRef]]:
    """K contiguous packages; K = len(units) is layer-by-layer, K = 1 one pass for everything."""
    if not 1 <= num_packages <= len(units):
        raise ValueError(
            f"packages={num_packages} must lie in [1, {len(units)}] (the number of basic units)"
        )
    size, extra = divmod(len(units), num_packages)
    packages, start = [], 0
    for index in range(num_packages):
        stop = start + size + (1 if index < extra else 0)
        packages.append(units[start:stop])
        start = stop
    return packages
