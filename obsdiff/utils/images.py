"""Image grids for quick visual comparison."""

from __future__ import annotations

import math

from PIL import Image


def make_grid(images: list[Image.Image], cols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile images (all the size of the first) row by row on a white canvas."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    width, height = images[0].size
    grid = Image.new(
        "RGB", (cols * width + (cols + 1) * pad, rows * height + (rows + 1) * pad), "white"
    )
    for i, image in enumerate(images):
        row, col = divmod(i, cols)
        grid.paste(image.convert("RGB"), (pad + col * (width + pad), pad + row * (height + pad)))
    return grid
