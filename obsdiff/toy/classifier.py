"""The attribute classifier behind the toy metrics: a small CNN reading all five attributes.

It is the toy world's measuring instrument (trained on every scene by
`python -m obsdiff.toy.train_classifier`): `PromptFidelity` compares what it reads with the
prompt, and `ClassifierFeatures` gives FID its penultimate features. Input convention (clean-fid's):
(B, 3, H, W) floats in [0, 255], any H, W (resized to 32 x 32 inside). Weights are stored with
safetensors, the settings and measurements in a JSON file beside them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from obsdiff.toy.data import ATTRIBUTES, IMAGE_SIZE, Scene


DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "data" / "toy" / "classifier.safetensors"


class AttributeClassifier(nn.Module):
    """Conv layers (the first at full resolution, then stride 2), one feature layer, a linear
    head per attribute of `ATTRIBUTES`."""

    def __init__(self, widths: Sequence[int] = (32, 32, 64, 64), feature_dim: int = 128) -> None:
        super().__init__()
        self.config: dict[str, Any] = {"widths": list(widths), "feature_dim": feature_dim}
        layers: list[nn.Module] = []
        channels = 3
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(channels, width, 3, stride=1 if i == 0 else 2, padding=1)]
            layers += [nn.ReLU()]
            channels = width
        self.convs = nn.Sequential(*layers)
        side = IMAGE_SIZE // 2 ** (len(widths) - 1)
        # Flattened, not pooled: position is one of the attributes.
        self.embed = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * side * side, feature_dim), nn.ReLU()
        )
        self.heads = nn.ModuleDict(
            {name: nn.Linear(feature_dim, len(values)) for name, values in ATTRIBUTES.items()}
        )

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 255] -> (B, 3, 32, 32) in [-1, 1]."""
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = F.interpolate(
                images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True
            )
        return images / 127.5 - 1.0

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 255] -> (B, feature_dim) penultimate features, taken before the
        ReLU (no dead dimensions: the FID covariance stays regular)."""
        flatten, linear = self.embed[0], self.embed[1]
        return linear(flatten(self.convs(self.prepare(images))))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) in [0, 255] -> {attribute: (B, number of values) logits}."""
        return self._heads(self._embed(self.prepare(images)))

    def _embed(self, prepared: torch.Tensor) -> torch.Tensor:
        return self.embed(self.convs(prepared))  # (B, feature_dim)

    def _heads(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(features) for name, head in self.heads.items()}

    def digest(self) -> str:
        """12 hex digits of the SHA-256 of the weights (names a trained classifier)."""
        sha = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            sha.update(name.encode())
            sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return sha.hexdigest()[:12]

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image]) -> list[Scene]:
        """The scene the classifier reads in each image (any sizes)."""
        if not images:
            return []
        device = next(self.parameters()).device
        prepared = torch.cat([self.prepare(pil_to_tensor(im).to(device)) for im in images])
        logits = self._heads(self._embed(prepared))
        indices = {name: values.argmax(dim=1).tolist() for name, values in logits.items()}
        return [
            Scene(**{name: ATTRIBUTES[name][indices[name][i]] for name in ATTRIBUTES})
            for i in range(len(images))
        ]


class ClassifierFeatures(nn.Module):
    """FID feature extractor: (B, 3, 299, 299) floats in [0, 255] -> (B, D) classifier features.

    The toy FID: `FID(reference_folder, feature_extractor=ClassifierFeatures(load_classifier()))`.
    """

    def __init__(self, classifier: AttributeClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.digest = classifier.digest()

    def extra_repr(self) -> str:
        return f"digest={self.digest}"  # repr keys cached metrics: a retrained classifier differs

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as a (1, 3, H, W) float tensor in [0, 255]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0)


def save_classifier(model: AttributeClassifier, path: Path, info: dict[str, Any]) -> Path:
    """Weights to `path` (safetensors), `model.config` and `info` to `path` with .json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    save_file(weights, str(path))
    record = {"architecture": model.config, **info}
    path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return path


def load_classifier(path: Path | None = None) -> AttributeClassifier:
    """The classifier stored at `path` (default: the committed one), in eval mode."""
    path = DEFAULT_WEIGHTS if path is None else Path(path)
    settings = path.with_suffix(".json")
    if not path.is_file() or not settings.is_file():
        raise FileNotFoundError(
            f"no attribute classifier at {path} (with {settings.name}); train one with "
            "`python -m obsdiff.toy.train_classifier`"
        )
    architecture = json.loads(settings.read_text())["architecture"]
    model = AttributeClassifier(**architecture)
    model.load_state_dict(load_file(str(path)))
    return model.eval()
