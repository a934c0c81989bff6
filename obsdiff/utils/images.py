"""Image files and grids: one name per image (its prompt id), atomic writes, grids.

Image i of a prompt set is `0000007.png` wherever it is written (evaluation images, samples,
the toy FID reference), so folders of two models compare file by file and the report finds an
image by its id.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image


PARTIAL = ".part"  # suffix of an image being written


def image_name(image_id: int) -> str:
    """The file name of image `image_id`: 0000007.png."""
    return f"{image_id:07d}.png"


def image_id(path: Path) -> int | None:
    """The id of an image file named by `image_name`, else None."""
    return int(path.stem) if path.suffix == ".png" and path.stem.isdigit() else None


def save_image(image: Image.Image, target: Path) -> None:
    """Write `image` as PNG to `target` atomically: an interrupted write leaves no half image
    under its name (only a `.part` file, which `remove_partial` clears)."""
    partial = target.with_name(target.name + PARTIAL)
    image.save(partial, format="PNG")
    partial.replace(target)


def remove_partial(folder: Path) -> None:
    """Delete the `.part` files an interrupted run left in `folder`."""
    for partial in folder.glob(f"*{PARTIAL}"):
        partial.unlink(missing_ok=True)


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
