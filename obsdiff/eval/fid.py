"""FID with clean-fid: generated images against a reference folder or precomputed statistics.

The feature extractor is injectable: clean-fid's Inception (default; clean-fid fetches its
weights on first use into the system temp directory, so on an offline machine put
`inception-2015-12-05.pt` there beforehand) or any module mapping (B, 3, 299, 299) floats in
[0, 255] to (B, D) features (tests use a tiny one). Reference statistics are cached as `.npz`
(mu, sigma), loaded without pickle.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cleanfid import downloads_helper
from cleanfid import fid as cleanfid
from torch import nn


FID_MODES = ("clean", "legacy_pytorch", "legacy_tensorflow")
# Where clean-fid looks for its Inception weights (clean and legacy_tensorflow modes).
INCEPTION_DIR = Path("./" if platform.system() == "Windows" else "/tmp")
INCEPTION_FILE = "inception-2015-12-05.pt"


def ensure_inception(mode: str) -> Path:
    """The Inception weights of `mode`, downloaded now when missing (clean-fid would fetch them
    only when the first features are computed, after every image is rendered), or one
    FileNotFoundError saying where to put them. Written atomically (no half file is kept)."""
    if mode == "legacy_pytorch":
        from cleanfid.inception_pytorch import FID_WEIGHTS_URL

        url = FID_WEIGHTS_URL
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    else:
        url, path = downloads_helper.inception_url, INCEPTION_DIR / INCEPTION_FILE
    if path.is_file():
        return path
    tmp = path.with_name(path.name + ".part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(tmp), progress=False)
        tmp.replace(path)
    except Exception as err:  # no network, refused, interrupted: nothing is left behind
        tmp.unlink(missing_ok=True)
        reason = f"{type(err).__name__}: {next(iter(str(err).splitlines()), '')}"
        raise FileNotFoundError(
            f"FID's Inception weights {str(path)!r} (eval.fid.mode={mode}) are missing and could "
            f"not be downloaded ({reason}); "
            f"on a machine without network access copy {Path(url).name} from {url} there, "
            "or set eval.fid.enabled=false"
        ) from None
    return path


class FID:
    def __init__(
        self,
        reference: str | Path,
        mode: str = "clean",
        feature_extractor: nn.Module | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        cache_dir: Path | None = None,
    ) -> None:
        self.reference = Path(reference).expanduser()
        if not (
            self.reference.is_dir() or self.reference.suffix == ".npz" and self.reference.is_file()
        ):
            raise FileNotFoundError(
                f"FID reference {str(self.reference)!r} is neither a folder of images nor an .npz "
                "file of statistics (mu, sigma); set eval.fid.reference to one "
                "(or eval.fid.enabled=false)"
            )
        if mode not in FID_MODES:
            raise ValueError(f"FID mode {mode!r}; use clean, legacy_pytorch or legacy_tensorflow")
        self.mode = mode
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self._extractor = feature_extractor

    @property
    def extractor(self) -> nn.Module:
        if self._extractor is None:
            self._extractor = cleanfid.build_feature_extractor(self.mode, self.device)
        return self._extractor

    def features(self, folder: Path) -> np.ndarray:
        """The features of every image in `folder` (and below it), in path order, as clean-fid
        lists a folder. (images, D)"""
        found = {f for ext in cleanfid.EXTENSIONS for f in folder.rglob(f"*.{ext}")}
        files = sorted(str(f) for f in found if not f.name.startswith("."))  # as glob lists them
        return self.file_features([Path(f) for f in files])

    def file_features(self, files: Sequence[Path]) -> np.ndarray:
        """The features of `files`, in that order. (images, D)"""
        return cleanfid.get_files_features(
            [str(f) for f in files],
            model=self.extractor,
            num_workers=0,
            batch_size=self.batch_size,
            device=self.device,
            mode=self.mode,
            verbose=False,
        )

    def statistics(self, folder: Path) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of the features of every image in `folder`."""
        return gaussian(self.features(folder))

    def reference_statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """From the `.npz`, or computed from the folder: once per (folder, its file names, mode,
        extractor) when `cache_dir` is given, so that every job of a sweep reuses them."""
        if not self.reference.is_dir():
            return _load_npz(self.reference)
        cached = None if self.cache_dir is None else self.cache_dir / self._cache_name()
        if cached is not None and cached.is_file():
            return _load_npz(cached)
        mu, sigma = self.statistics(self.reference)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cached, mu=mu, sigma=sigma)
        return mu, sigma

    def _cache_name(self) -> str:
        files = sorted(p.name for p in self.reference.iterdir() if p.is_file())
        extractor = "inception" if self._extractor is None else repr(self._extractor)
        record = json.dumps([str(self.reference.resolve()), files, self.mode, extractor])
        return f"fid-reference-{hashlib.sha256(record.encode()).hexdigest()[:16]}.npz"

    def save_reference_statistics(self, path: Path) -> None:
        mu, sigma = self.reference_statistics()
        np.savez(path, mu=mu, sigma=sigma)

    def compute(self, folder: Path) -> dict[str, Any]:
        return self.describe(self.distance(self.features(folder)))

    def distance(self, features: np.ndarray) -> float:
        """FID of a set of features against the reference."""
        return frechet_distance(*gaussian(features), *self.reference_statistics())

    def describe(self, value: float) -> dict[str, Any]:
        return {"fid": value, "fid_reference": str(self.reference), "fid_mode": self.mode}


@dataclass
class FIDFeatures:
    """What an FID interval (and a paired FID difference) is recomputed from: the features of
    the generated images and their prompt groups, and, where the reference images are images
    of the same prompts (the dense model's, the toy dataset's), their features and groups, so
    that a resample of prompts resamples both sides; else the reference statistics stay fixed.
    Saved as `fid_features.npz` beside the evaluation."""

    features: np.ndarray  # (images, D)
    groups: np.ndarray  # (images,) prompt group of each image
    reference: np.ndarray | None = None  # (reference images, D)
    reference_groups: np.ndarray | None = None  # (reference images,)
    statistics: tuple[np.ndarray, np.ndarray] | None = None  # else: fixed reference (mu, sigma)

    def distance(self, drawn: np.ndarray) -> float:
        """FID of the images of the `drawn` prompt groups (with replacement) against the
        reference images of the same groups, or against the fixed reference statistics."""
        mine = np.concatenate([np.flatnonzero(self.groups == g) for g in drawn])
        if self.reference is None or self.reference_groups is None:
            if self.statistics is None:
                raise ValueError("FIDFeatures without a reference: give its statistics")
            return frechet_distance(*gaussian(self.features[mine]), *self.statistics)
        theirs = np.concatenate([np.flatnonzero(self.reference_groups == g) for g in drawn])
        return frechet_distance(*gaussian(self.features[mine]), *gaussian(self.reference[theirs]))

    def save(self, path: Path) -> None:
        arrays = {"features": self.features, "groups": self.groups}
        if self.reference is not None and self.reference_groups is not None:
            arrays.update(reference=self.reference, reference_groups=self.reference_groups)
        if self.statistics is not None:
            arrays.update(reference_mu=self.statistics[0], reference_sigma=self.statistics[1])
        np.savez(path, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path) -> FIDFeatures:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        statistics = None
        if "reference_mu" in arrays:
            statistics = (arrays["reference_mu"], arrays["reference_sigma"])
        return cls(
            arrays["features"], arrays["groups"],
            arrays.get("reference"), arrays.get("reference_groups"), statistics,
        )  # fmt: skip


def gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of features (images, D), float64."""
    data = np.asarray(features, dtype=np.float64)
    return data.mean(axis=0), np.cov(data, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), the trace of the root taken as the sum of
    the square roots of the eigenvalues of S1^1/2 S2 S1^1/2 (symmetric, same eigenvalues as
    S1 S2). Equal to clean-fid's `frechet_distance` (scipy's sqrtm) where that is well
    conditioned; unlike it, stable for the rank-deficient covariances of small or resampled
    image sets (bootstrap intervals), with no imaginary parts to discard."""
    root = _psd_sqrt(sigma1)
    inner = np.linalg.eigvalsh(root @ sigma2 @ root)
    trace_root = float(np.sqrt(np.clip(inner, 0.0, None)).sum())
    difference = np.asarray(mu1) - np.asarray(mu2)
    return float(difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return data["mu"], data["sigma"]
