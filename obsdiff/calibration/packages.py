"""Module packages (paper Sec. 4.2): basic units listed block by block, cut into K contiguous
packages of near-equal size (the first `len % K` packages get one unit more), each package
calibrated in its own pass over the calibration set."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from obsdiff.models.base import ModelAdapter, Unit


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
    adapter: ModelAdapter, denoiser: nn.Module, block_range: tuple[int, int] | None = None
) -> list[UnitRef]:
    """Every basic unit of the blocks in [start, end), block by block, in forward order."""
    blocks = adapter.blocks(denoiser)
    start, end = block_range if block_range is not None else (0, len(blocks))
    if not 0 <= start < end <= len(blocks):
        raise ValueError(
            f"blocks=[{start},{end}) is outside the model's {len(blocks)} blocks; use 0 <= start "
            f"< end <= {len(blocks)}"
        )
    units = []
    for index in range(start, end):
        name, block = blocks[index]
        for unit in adapter.block_units(block):
            units.append(UnitRef(index, name, unit))
    if not units:
        raise ValueError(f"no target modules in blocks [{start}, {end})")
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
