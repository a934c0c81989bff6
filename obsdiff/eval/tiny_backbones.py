"""Tiny random-weight metric backbones built in code: the `eval=tiny` set runs every metric code
path offline in seconds. Their numbers only say that the code ran, not how good images are.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from obsdiff.eval.clip_score import FeatureAdapter
from obsdiff.models.tiny import char_clip_tokenizer, clip_text_config


class RandomFeatures(nn.Module):
    """Fixed random convolutional features for FID: (B, 3, H, W) in [0, 255] -> (B, D)."""

    def __init__(self, dim: int = 32, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, dim, kernel_size=8, stride=8)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) / 14)
            self.conv.bias.zero_()  # type: ignore[union-attr]
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv(images / 127.5 - 1.0))  # (B, D, H/8, W/8)
        return self.pool(x).flatten(1)  # (B, D)


def tiny_clip(seed: int = 0) -> tuple[nn.Module, CLIPProcessor]:
    """A random-weight CLIP of two 32-wide layers with a character tokenizer (no files)."""
    torch.manual_seed(seed)
    text = clip_text_config(num_hidden_layers=1, hidden_act="quick_gelu").to_dict()
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4}
    vision.update(num_hidden_layers=1, image_size=32, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=char_clip_tokenizer(),
    )
    return FeatureAdapter(model.eval()), processor
