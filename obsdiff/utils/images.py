"""Image files and grids: one name per image (its prompt id), atomic writes, grids.

Image i of a prompt set is `0000007.png` wherever it is written (evaluation images, samples,
the toy FID reference), so folders of two models compare file by file and the report finds an
image by its id. Video i is `0000007.gif` (an animated preview) beside its frames
`0000007/0000.png`, `0000007/0001.png`, ...
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps


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


def video_name(video_id: int) -> str:
    """The preview file name of video `video_id`: 0000007.gif (its frames: 0000007/)."""
    return f"{video_id:07d}.gif"


def save_video(frames: list[Image.Image], target: Path, fps: int) -> None:
    """Write a video's frames as PNGs into the folder `target` names without its suffix, then
    its animated GIF preview to `target` atomically, last: a preview on disk means every frame
    is too."""
    folder = target.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    for index, frame in enumerate(frames):
        save_image(frame, folder / f"{index:04d}.png")
    partial = target.with_name(target.name + PARTIAL)
    first, *rest = [frame.convert("RGB") for frame in frames]
    duration = round(1000 / fps)  # milliseconds a frame
    first.save(partial, format="GIF", save_all=True, append_images=rest, duration=duration, loop=0)
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


def captioned_grid(
    rows: list[tuple[str, list[Image.Image | None]]],
    columns: list[str],
    cell: int = 128,
    label_width: int = 200,
    title: str = "",
) -> Image.Image:
    """A labelled grid: one row per (caption, images), one titled column per image, each image
    enlarged (nearest neighbour, so small images stay sharp) to `cell` pixels; None draws a
    grey placeholder. Captions wrap in the left margin."""
    gap, top = 4, 20 + (16 if title else 0)
    width = label_width + len(columns) * (cell + gap)
    canvas = Image.new("RGB", (width, top + len(rows) * (cell + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill="black")
    for col, name in enumerate(columns):
        draw.text((label_width + col * (cell + gap) + 2, top - 16), name, fill="black")
    chars = max(label_width // 7, 8)
    for row, (caption, images) in enumerate(rows):
        y = top + row * (cell + gap)
        wrapped = "\n".join(textwrap.wrap(caption, chars)[: cell // 12])
        draw.multiline_text((4, y + 2), wrapped, fill="black")
        for col, image in enumerate(images):
            x = label_width + col * (cell + gap)
            if image is None:
                canvas.paste(Image.new("RGB", (cell, cell), (160, 160, 160)), (x, y))
                continue
            small = max(image.size) < cell
            method = Image.Resampling.NEAREST if small else Image.Resampling.BICUBIC
            fitted = ImageOps.pad(image.convert("RGB"), (cell, cell), method, color="white")
            canvas.paste(fitted, (x, y))
    return canvas
