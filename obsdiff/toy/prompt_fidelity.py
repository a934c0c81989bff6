"""Prompt fidelity: the toy world's CLIP score, read by the attribute classifier.

For each image, the fraction of the five attributes its (toy-caption) prompt names that the
classifier sees in it; reported as the mean over images and as the accuracy per attribute. The
toy FID uses the same classifier's features (`obsdiff.toy.classifier.ClassifierFeatures`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from obsdiff.toy.classifier import AttributeClassifier, ClassifierFeatures, load_classifier
from obsdiff.toy.data import ATTRIBUTES, parse_caption


__all__ = ["ClassifierFeatures", "PromptFidelity"]


class PromptFidelity:
    def __init__(
        self,
        classifier: AttributeClassifier | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ) -> None:
        model = load_classifier() if classifier is None else classifier
        self.classifier = model.eval().to(torch.device(device))
        self.name = f"attribute_classifier:{model.digest()}"
        self.batch_size = batch_size

    @torch.no_grad()
    def compute(
        self, images: Sequence[Image.Image | Path], prompts: Sequence[str]
    ) -> dict[str, Any]:
        """Mean fraction of each prompt's attributes seen in its image (PIL or files, opened a
        batch at a time), and the accuracy of each attribute."""
        if len(images) != len(prompts) or not images:
            raise ValueError(
                f"give one prompt per image (and at least one image): {len(images)} images, "
                f"{len(prompts)} prompts"
            )
        wanted = []
        for i, prompt in enumerate(prompts):
            try:
                wanted.append(asdict(parse_caption(prompt)))
            except ValueError as error:
                raise ValueError(f"prompt {i} is not a toy caption: {error}") from None
        hits = dict.fromkeys(ATTRIBUTES, 0)
        for start in range(0, len(images), self.batch_size):
            batch = [_open(image) for image in images[start : start + self.batch_size]]
            for offset, seen in enumerate(self.classifier.predict(batch)):
                target = wanted[start + offset]
                for name, value in asdict(seen).items():
                    hits[name] += value == target[name]
        per_attribute = {name: count / len(images) for name, count in hits.items()}
        return {
            "prompt_fidelity": sum(per_attribute.values()) / len(per_attribute),
            **{f"prompt_fidelity_{name}": value for name, value in per_attribute.items()},
        }


def _open(image: Image.Image | Path) -> Image.Image:
    if isinstance(image, Path):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    return image.convert("RGB")
