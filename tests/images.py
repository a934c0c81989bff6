"""Image-text folders for the tests of the options that read one (`recover.images`,
`method.images`)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw


def image_folder(folder: Path, count: int, metadata: bool = False) -> Path:
    """`count` small images of coloured shapes, their captions beside them (or in
    metadata.jsonl)."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = ["red", "green", "blue", "yellow"]
    lines = []
    for index in range(count):
        colour = colours[index % len(colours)]
        image = Image.new("RGB", (48, 40), "white")
        ImageDraw.Draw(image).ellipse((8, 6, 36, 34), fill=colour)
        image.save(folder / f"{index}.png")
        caption = f"a {colour} circle"
        if metadata:
            lines.append(json.dumps({"file_name": f"{index}.png", "text": caption}))
        else:
            (folder / f"{index}.txt").write_text(caption)
    if metadata:
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder
