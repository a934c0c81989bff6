"""Calibrate once for a sweep: the first package's statistics, saved and reused.

The first package of a prune run sees the dense model: its statistics depend on the model and
the calibration (prompts, sampling, weighting, batches, seeds, CFG half, Hessian precision, the
package's layers, the number of ranks summing them), not on the method, granularity or sparsity
(but for a method's token weighting, `ObsDiff.token_weighting`, which weights the Hessians).
Jobs of a sweep that share those reuse one calibration pass for it: the only pass when
`packages=1`. Later packages see the earlier ones pruned, so they are never cached.

An entry holds both kinds of statistics (the Hessian for OBS, the moments for Wanda and DSnoT),
so every method reads what it needs from any entry; the job that writes it computes both (for
Wanda and DSnoT a Hessian more for that package). Entries are safetensors files named by the
hash of everything the statistics depend on (`cache_key`), written atomically; a hit gives the
same bits as the pass it replaces (the same arithmetic in the same order), so the pruned weights
are the same with and without the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from obsdiff.methods.package import Package


log = logging.getLogger(__name__)


def cache_key(settings: dict[str, Any]) -> str:
    """The hash of everything the first package's statistics depend on (plain data)."""
    text = json.dumps(
        {**settings, "torch": torch.__version__}, sort_keys=True, default=str
    )  # another torch may sum in another order
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class StatisticsCache:
    """A folder of cached first-package statistics (`statistics_cache=<folder>`)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str, package: Package) -> bool:
        """Fill the package's statistics from the entry `key`; False (nothing changed) when
        there is none or it lacks one of them."""
        file = self.path(key)
        if not file.is_file():
            return False
        saved = safetensors.torch.load_file(str(file))
        pairs = []
        for group in package.groups:
            if group.stats is None:
                continue
            for kind, mine in group.stats.named_state().items():
                found = saved.get(f"{group.names[0]}/{kind}")
                if found is None or found.shape != mine.shape or found.dtype != mine.dtype:
                    log.warning("%s lacks %s of %s: recalibrating", file, kind, group.names[0])
                    return False
                pairs.append((mine, found))
        for mine, found in pairs:
            mine.copy_(found)
        log.info("package 1: statistics from the cache (%s)", file.name)
        return True

    def save(self, key: str, package: Package) -> None:
        """Write the package's statistics as entry `key` (atomically: a reader sees the whole
        file or none)."""
        tensors = {
            f"{group.names[0]}/{kind}": tensor.detach().cpu().contiguous()
            for group in package.groups
            if group.stats is not None
            for kind, tensor in group.stats.named_state().items()
        }
        self.root.mkdir(parents=True, exist_ok=True)
        file = self.path(key)
        partial = file.with_name(f".{file.name}.{os.getpid()}.partial")
        safetensors.torch.save_file(tensors, str(partial))
        os.replace(partial, file)
        log.info("package 1: statistics cached (%s, %.1f MiB)", file, file.stat().st_size / 2**20)
