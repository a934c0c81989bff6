"""Dense-relative metrics: each image against the dense model's image of the same prompt and
seed, the paired measures compression work reports against the original model.

    psnr                 dB, data range 1 (torchmetrics); infinite for identical images
    ssim                 structural similarity (torchmetrics, 11-pixel Gaussian window)
    lpips                learned perceptual distance (torchmetrics' LPIPS, images in [-1, 1])
    latent_rel_error     ||z - z_dense|| / ||z_dense|| of the final latents (before the VAE)
    toy_feature_distance ||f(x) - f(x_dense)|| in the toy attribute classifier's feature space

LPIPS's backbone is injectable as FID's and CLIP's: `alex` (the LPIPS default), `vgg` or
`squeeze` load torchvision's ImageNet weights (fetched once into $TORCH_HOME; on a machine
without network put them there beforehand) under torchmetrics' linear heads; `tiny` is a fixed
random backbone under the same heads, for tests (its numbers only say that the code ran).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import safetensors.torch
import torch
from PIL import Image
from torch import nn
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)
from torchmetrics.functional.image.lpips import _NoTrainLpips

from obsdiff.utils.scores import ImageScores


LPIPS_BACKBONES = ("alex", "vgg", "squeeze", "tiny")
LATENTS_KEY = "latents"


def build_lpips(backbone: str) -> nn.Module:
    """torchmetrics' LPIPS network (its shipped linear heads) on `backbone`; a module taking two
    (N, 3, H, W) batches in [-1, 1] to (N, 1, 1, 1) distances. One clear error when the
    torchvision weights cannot be had."""
    if backbone not in LPIPS_BACKBONES:
        raise ValueError(f"lpips backbone {backbone!r}; use one of {', '.join(LPIPS_BACKBONES)}")
    if backbone == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return _NoTrainLpips(net="squeeze", pnet_rand=True).eval()
    try:
        return _NoTrainLpips(net=backbone).eval()  # type: ignore[arg-type]
    except Exception as err:  # no network, no cached weights
        raise ValueError(
            f"eval.dense_relative.lpips={backbone}: torchvision's ImageNet weights for the LPIPS "
            f"backbone could not be loaded ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "on a machine without network access copy them into $TORCH_HOME/hub/checkpoints, "
            "or set eval.dense_relative.lpips=null"
        ) from None


def _images(files: Sequence[Path]) -> torch.Tensor:
    """(N, 3, H, W) float64 in [0, 1]."""
    arrays = []
    for file in files:
        with Image.open(file) as image:
            arrays.append(np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def load_latents(file: Path) -> torch.Tensor:
    return safetensors.torch.load_file(str(file))[LATENTS_KEY]


class DenseRelative:
    """Computes the dense-relative metrics of images (and latents) against their dense pairs."""

    name = "dense_relative"

    def __init__(
        self,
        lpips: nn.Module | None = None,
        features: nn.Module | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> None:
        """`lpips`: an LPIPS network (`build_lpips`), None to leave LPIPS out; `features`: a
        feature extractor on (B, 3, H, W) floats in [0, 255] (the toy classifier's), None to
        leave the feature distance out."""
        self.device = torch.device(device)
        self.lpips = None if lpips is None else lpips.to(self.device)
        self.features = None if features is None else features.to(self.device)
        self.batch_size = batch_size

    def describe(self) -> dict[str, str]:
        return {
            "lpips": "off" if self.lpips is None else repr(self.lpips)[:200],
            "features": "off" if self.features is None else repr(self.features),
        }

    @torch.no_grad()
    def compute(
        self,
        images: Sequence[Path],
        dense_images: Sequence[Path],
        latents: Sequence[Path] | None = None,
        dense_latents: Sequence[Path] | None = None,
    ) -> ImageScores:
        """Per-image scores of `images` against `dense_images` (same order, same sizes)."""
        if len(images) != len(dense_images) or not images:
            raise ValueError("give one dense image per image (and at least one image)")
        values: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            x = _images(images[start:stop]).to(self.device, torch.float64)  # (B, 3, H, W)
            y = _images(dense_images[start:stop]).to(self.device, torch.float64)
            if x.shape != y.shape:
                raise ValueError(f"image sizes differ from the dense ones: {x.shape} vs {y.shape}")
            batch = {
                "psnr": peak_signal_noise_ratio(
                    x, y, data_range=1.0, reduction="none", dim=(1, 2, 3)
                ),
                "ssim": cast(
                    torch.Tensor,
                    structural_similarity_index_measure(x, y, data_range=1.0, reduction="none"),
                ),
            }
            if self.lpips is not None:
                batch["lpips"] = self.lpips(2 * x.float() - 1, 2 * y.float() - 1).flatten()
            if self.features is not None:
                fx, fy = self.features(255 * x.float()), self.features(255 * y.float())  # (B, D)
                batch["toy_feature_distance"] = (fx.double() - fy.double()).norm(dim=1)
            for key, value in batch.items():
                values.setdefault(key, []).append(value.double().cpu().reshape(-1))
        if latents is not None and dense_latents is not None:
            errors = []
            for mine, theirs in zip(latents, dense_latents, strict=True):
                z, z_dense = load_latents(mine).double(), load_latents(theirs).double()
                errors.append(((z - z_dense).norm() / z_dense.norm()).reshape(1))
            values["latent_rel_error"] = [torch.cat(errors)]
        return ImageScores({k: torch.cat(v).numpy() for k, v in values.items()})
