"""The noise of image i: a CPU generator seeded with `seed + i`, whatever the batch or device."""

from __future__ import annotations

import torch


def generators_for(seed: int, ids: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: image `i` is seeded with `seed + i`."""
    return [torch.Generator("cpu").manual_seed(seed + i) for i in ids]


def image_generators(seed: int, start: int, count: int) -> list[torch.Generator]:
    """Generators of images start .. start + count - 1."""
    return generators_for(seed, list(range(start, start + count)))
