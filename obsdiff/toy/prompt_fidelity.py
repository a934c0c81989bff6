"""Prompt fidelity: the toy world's CLIP score, read by the attribute classifier.

For each image, the fraction of the five attributes its (toy-caption) prompt names that the
classifier sees in it; reported as the mean over images and as the accuracy per attribute. The
toy FID uses the same classifier's features (`obsdiff.toy.classifier.ClassifierFeatures`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from obsdiff.toy.classifier import AttributeClassifier, ClassifierFeatures, load_classifier
from obsdiff.toy.data import ATTRIBUTES, parse_caption
from obsdiff.utils.scores import ImageScores


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
    def compute(self, images: Sequence[Image.Image | Path], prompts: Sequence[str]) -> ImageScores:
        """Per image (PIL or files, opened a batch at a time): the fraction of its prompt's
        attributes seen in it, and whether each attribute is (1 or 0); their means are the
        prompt fidelity and the per-attribute accuracies."""
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
        hits = {name: np.zeros(len(images)) for name in ATTRIBUTES}  # (images,) each
        for start in range(0, len(images), self.batch_size):
            batch = [_open(image) for image in images[start : start + self.batch_size]]
            for offset, seen in enumerate(self.classifier.predict(batch)):
                target = wanted[start + offset]
                for name, value in asdict(seen).items():
                    hits[name][start + offset] = float(value == target[name])
        return ImageScores(
            {
                "prompt_fidelity": np.mean(np.stack(list(hits.values())), axis=0),
                **{f"prompt_fidelity_{name}": value for name, value in hits.items()},
            }
        )


def _open(image: Image.Image | Path) -> Image.Image:
    if isinstance(image, Path):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    return image.convert("RGB")
