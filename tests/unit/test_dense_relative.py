"""Dense-relative metrics on hand-made image pairs: identical images, a known shift (the
closed-form PSNR), latents and features with known distances."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from obsdiff.eval.dense_relative import LATENTS_KEY, DenseRelative, build_lpips
from obsdiff.prompts.eval_sets import EvalPrompts
from obsdiff.utils.io import save_tensors


pytestmark = pytest.mark.unit


def write(folder: Path, name: str, pixels: np.ndarray) -> Path:
    folder.mkdir(exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(folder / name)
    return folder / name


class MeanColour(nn.Module):
    """Features: the mean of each channel, in [0, 255]. (B, 3)"""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))


def test_identical_images_and_a_known_shift(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = [rng.integers(20, 200, size=(32, 32, 3)) for _ in range(3)]
    shifts = [0, 10, 25]  # grey levels added to every pixel: no clipping
    dense = [write(tmp_path / "dense", f"{i}.png", b) for i, b in enumerate(base)]
    mine = [
        write(tmp_path / "mine", f"{i}.png", b + s)
        for i, (b, s) in enumerate(zip(base, shifts, strict=True))
    ]
    metric = DenseRelative(build_lpips("tiny"), MeanColour())
    scores = metric.compute(mine, dense).values
    assert math.isinf(scores["psnr"][0]) and scores["ssim"][0] == pytest.approx(1.0)
    assert scores["lpips"][0] == 0.0 and scores["toy_feature_distance"][0] == 0.0
    for i, shift in enumerate(shifts[1:], start=1):
        # MSE = (shift / 255)^2 with data range 1: PSNR = 20 log10(255 / shift) (torchmetrics
        # takes log(10) in float32: agreement to 1e-7 relative)
        assert scores["psnr"][i] == pytest.approx(20 * math.log10(255 / shift), rel=1e-7)
        assert scores["ssim"][i] < 1.0 and scores["lpips"][i] > 0.0
        assert scores["toy_feature_distance"][i] == pytest.approx(shift * math.sqrt(3), rel=1e-5)
    assert scores["psnr"][1] > scores["psnr"][2] and scores["lpips"][1] < scores["lpips"][2]
    assert "latent_rel_error" not in scores  # no latents given
    with pytest.raises(ValueError, match="one dense image per image"):
        metric.compute(mine, dense[:2])


def test_latent_relative_error(tmp_path: Path) -> None:
    dense_latent = torch.tensor([[3.0, 4.0]])  # norm 5
    files = []
    for name, latent in [
        ("dense", dense_latent),
        ("same", dense_latent),
        ("off", dense_latent + 1),
    ]:
        save_tensors(tmp_path / f"{name}.safetensors", {LATENTS_KEY: latent})
        files.append(tmp_path / f"{name}.safetensors")
    image = write(tmp_path / "img", "0.png", np.full((16, 16, 3), 100))
    scores = (
        DenseRelative()
        .compute([image, image], [image, image], files[1:], [files[0], files[0]])
        .values
    )
    assert scores["latent_rel_error"].tolist() == pytest.approx([0.0, math.sqrt(2) / 5])
    assert set(scores) == {"psnr", "ssim", "latent_rel_error"}  # LPIPS and features off


def test_lpips_backbones_are_named_and_images_per_prompt() -> None:
    with pytest.raises(ValueError, match="lpips backbone 'resnet'"):
        build_lpips("resnet")
    prompts = EvalPrompts([3, 7], ["a", "b"], "x", "")
    assert prompts.repeated(1) is prompts
    three = prompts.repeated(3)
    assert three.ids == [9, 10, 11, 21, 22, 23] and three.prompts == ["a"] * 3 + ["b"] * 3
    with pytest.raises(ValueError, match="images_per_prompt=0"):
        prompts.repeated(0)
