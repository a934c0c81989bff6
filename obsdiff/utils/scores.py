"""Per-image scores: what every image metric returns, so that evaluations can report means,
intervals over prompts and paired differences between models (same prompts, same seeds)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ImageScores:
    """`values[name]`: one float per image (in the order the images were given); `info`: what
    they were measured with (model names, backends), recorded beside the means."""

    values: dict[str, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = {k: np.asarray(v, dtype=np.float64) for k, v in self.values.items()}
        sizes = {v.shape for v in self.values.values()}
        if len(sizes) > 1 or any(len(s) != 1 for s in sizes):
            raise ValueError(f"per-image scores need one value per image: shapes {sizes}")

    def means(self) -> dict[str, float]:
        return {k: float(v.mean()) for k, v in self.values.items()}
