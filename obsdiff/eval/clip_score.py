"""CLIP score with torchmetrics, reported as the raw cosine similarity (the paper's ~0.31).

The model is a hub id or local path (default ViT-B/16, as the paper) or a zero-argument callable
returning (model, processor), so tests inject a tiny CLIP built in code. torchmetrics 1.9
expects the feature methods of transformers 4 (tensors); `FeatureAdapter` gives transformers 5
models that interface (torchmetrics issue 3407).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchmetrics.functional.multimodal.clip_score import _clip_score_update
from torchmetrics.multimodal.clip_score import CLIPScore as TorchmetricsCLIPScore
from transformers import CLIPModel, CLIPProcessor

from obsdiff.utils.memory import own_memory
from obsdiff.utils.scores import ImageScores


DEFAULT_CLIP = "openai/clip-vit-base-patch16"


class FeatureAdapter(nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return tensors."""

    def __init__(self, model: CLIPModel) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(output: Any) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def load_clip(name_or_path: str) -> Callable[[], tuple[nn.Module, CLIPProcessor]]:
    def load() -> tuple[nn.Module, CLIPProcessor]:
        model = CLIPModel.from_pretrained(name_or_path, use_safetensors=True).eval()
        own_memory(model)  # scores independent of where the file mapping lands (utils.memory)
        return FeatureAdapter(model), CLIPProcessor.from_pretrained(name_or_path)

    return load


class CLIPScore:
    def __init__(
        self,
        model: str | Callable[[], tuple[nn.Module, Any]] = DEFAULT_CLIP,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> None:
        self.name = model if isinstance(model, str) else getattr(model, "__name__", "custom")
        loader = load_clip(model) if isinstance(model, str) else model
        self.metric = TorchmetricsCLIPScore(model_name_or_path=loader)  # type: ignore[arg-type]
        self.metric = self.metric.to(torch.device(device))
        self.batch_size = batch_size

    @torch.no_grad()
    def compute(self, images: Sequence[Image.Image | Path], prompts: Sequence[str]) -> ImageScores:
        """cos(image, its prompt) of every image (PIL or files, opened a batch at a time). The
        mean is torchmetrics' CLIPScore / 100 (which also clamps a negative mean at 0)."""
        if len(images) != len(prompts) or not images:
            raise ValueError("give one prompt per image (and at least one image)")
        scores = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            tensors = [torch.from_numpy(_to_array(image)).permute(2, 0, 1) for image in batch]
            # torchmetrics' per-image step of CLIPScore.update: 100 x cos, (batch,)
            score, _ = _clip_score_update(
                tensors, list(prompts[start : start + self.batch_size]),
                self.metric.model, self.metric.processor,
            )  # fmt: skip
            scores.append(score.double().cpu() / 100.0)
        return ImageScores(
            {"clip_score": torch.cat(scores).numpy()},
            {"clip_model": self.name, "clip_scale": "cosine"},
        )


def _to_array(image: Image.Image | Path) -> np.ndarray:
    if isinstance(image, Path):
        with Image.open(image) as opened:
            return np.asarray(opened.convert("RGB")).copy()
    return np.asarray(image.convert("RGB")).copy()
