"""Image-text folders: real images and their captions, as the recovery's data
(`recover.images`) and Diff-Pruning's (`method.images`).

The folder holds images (png, jpg, jpeg, webp) and their captions, either in `metadata.jsonl`
(one `{"file_name": ..., "text": ...}` a line: the Hugging Face `imagefolder` layout) or in a
`.txt` file of the same name beside each image. `pixels` reads one image resized (shorter side)
and centre cropped to the model's sampling resolution.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
METADATA = "metadata.jsonl"


def read_image_folder(folder: str | Path, key: str = "recover.images") -> list[tuple[Path, str]]:
    """The folder's (image, caption) pairs, sorted by file name; ValueError naming `key` (the
    setting that gave the folder) and the fix for a missing folder, no images or a missing
    caption."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"{key}={folder}: no such folder; give a folder of images")
    if (root / METADATA).is_file():
        pairs = []
        for number, line in enumerate((root / METADATA).read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                pairs.append((root / str(entry["file_name"]), str(entry["text"])))
            except (ValueError, KeyError, TypeError):
                raise ValueError(
                    f"{key}: {root / METADATA} line {number} is not "
                    '{"file_name": ..., "text": ...}'
                ) from None
        missing = [str(p) for p, _ in pairs if not p.is_file()]
        if missing:
            raise ValueError(f"{key}: {METADATA} names missing images, e.g. {missing[0]}")
    else:
        images = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        uncaptioned = [p.name for p in images if not p.with_suffix(".txt").is_file()]
        if uncaptioned:
            raise ValueError(
                f"{key}: {uncaptioned[0]} has no caption; put it in "
                f"{Path(uncaptioned[0]).with_suffix('.txt')} beside it, or all captions in "
                f"{root / METADATA}"
            )
        pairs = [(p, p.with_suffix(".txt").read_text().strip()) for p in images]
    if not pairs:
        raise ValueError(
            f"{key}={folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) with captions"
        )
    return sorted(pairs, key=lambda pair: str(pair[0]))


def pixels(path: Path, height: int, width: int) -> torch.Tensor:
    """The image resized (shorter side) and centre cropped to height x width, in [-1, 1]
    (3, height, width)."""
    image = Image.open(path).convert("RGB")
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(height, width, 3).permute(2, 0, 1).float() / 127.5 - 1
