"""ImageReward (THUDM's `image-reward` 1.5): the mean human-preference reward of the images for
their prompts.

image-reward 1.5 cannot be imported next to transformers 5 (its BLIP text encoder imports
helpers that `transformers.modeling_utils` dropped after 4.55), so it normally runs in its own
environment (`make imagereward-env`: transformers 4.55.4): `python=` names that interpreter and
`image_reward_worker.py` scores the images in a subprocess (prompts and paths in, scores out, as
JSON). `python=None` imports ImageReward in this process (for an environment where it imports),
and an injected `scorer` replaces both (tests).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from obsdiff.eval.image_reward_worker import score_grouped
from obsdiff.utils.scores import ImageScores


if TYPE_CHECKING:
    import torch


log = logging.getLogger(__name__)

DEFAULT_MODEL = "ImageReward-v1.0"
WORKER = Path(__file__).with_name("image_reward_worker.py")
ROOT = Path(__file__).resolve().parents[2]
FIX = (
    "install its isolated environment with `make imagereward-env` and set "
    "eval.image_reward.python=.venv-imagereward/bin/python, or disable it with "
    "eval.image_reward.enabled=false"
)
CHECK_TIMEOUT_S = 600  # importing ImageReward takes ~12 s (torch, transformers, diffusers, timm)

Scorer = Callable[[str, list[Path]], list[float]]


class ImageRewardError(RuntimeError):
    """ImageReward failed while scoring."""


class ImageRewardUnavailable(ImageRewardError):
    """ImageReward cannot run with the configured backend (missing package or interpreter)."""


class ImageReward:
    """`model`: an ImageReward model name or checkpoint path; `python`: the interpreter of the
    isolated environment (a path, relative ones tried against the working directory then the
    repository root, or a command on PATH), None to import ImageReward here; `batch_size`: images
    per `score` call; `env`: variables set for the worker (the main environment's PYTHONPATH and
    PYTHONHOME are not passed on)."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        python: str | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        download_root: str | None = None,
        scorer: Scorer | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"ImageReward batch_size={batch_size} must be >= 1")
        self.name = model
        self.python = python
        self.device = str(device)
        self.batch_size = batch_size
        self.download_root = (
            None if download_root is None else str(Path(download_root).expanduser())
        )
        self.scorer = scorer
        self.env = dict(env or {})
        self.backend = (
            "custom" if scorer is not None else "in-process" if python is None else "isolated"
        )
        self._model: Any = None

    def check(self) -> None:
        """Fail now, with one message saying how to fix it, if the backend cannot run."""
        if self.backend == "in-process":
            self._import()
        elif self.backend == "isolated":
            answer = self._run(["--check"], None, ImageRewardUnavailable, CHECK_TIMEOUT_S)
            log.info("ImageReward %s in %s", answer.get("image_reward"), self.interpreter())

    def compute(self, image_files: Sequence[Path], prompts: Sequence[str]) -> ImageScores:
        """The reward of every image for its prompt."""
        if len(image_files) != len(prompts) or not image_files:
            raise ValueError("give one prompt per image (and at least one image)")
        items = [
            (prompt, Path(file).absolute())
            for prompt, file in zip(prompts, image_files, strict=True)
        ]
        missing = [str(path) for _, path in items if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} images to score are missing, e.g. {missing[0]}"
            )
        if self.scorer is not None:
            scores = score_grouped(self.scorer, items, self.batch_size)
        elif self.backend == "in-process":
            scores = self._score_here(items)
        else:
            scores = self._score_isolated(items)
        return ImageScores(
            {"image_reward": np.asarray(scores, dtype=np.float64)},
            {"image_reward_model": self.name, "image_reward_backend": self.backend},
        )

    def interpreter(self) -> str:
        """The isolated environment's interpreter, checked to exist (symbolic links kept)."""
        path = Path(str(self.python)).expanduser()
        if path.is_absolute():
            candidates = [path]
        elif len(path.parts) > 1:
            candidates = list(dict.fromkeys([Path.cwd() / path, ROOT / path]))
        else:
            found = shutil.which(str(path))
            candidates = [Path(found)] if found else []
        for candidate in candidates:
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
        tried = ", ".join(str(c) for c in candidates) or "PATH"
        raise ImageRewardUnavailable(
            f"ImageReward: no interpreter eval.image_reward.python={self.python!r} "
            f"(looked in {tried}); {FIX}"
        )

    def _import(self) -> Any:
        try:
            import ImageReward as RM
        except Exception as error:  # ImportError, or whatever a broken dependency raises
            raise ImageRewardUnavailable(
                f"ImageReward cannot be imported in this environment ({type(error).__name__}: "
                f"{error}); image-reward 1.5 does not import with transformers 5 (its BLIP "
                f"imports helpers that transformers.modeling_utils dropped after 4.55), so "
                f"{FIX}"
            ) from error
        return RM

    def _score_here(self, items: list[tuple[str, Path]]) -> list[float]:
        import torch

        if self._model is None:
            RM = self._import()
            self._model = RM.load(self.name, device=self.device, download_root=self.download_root)
        with torch.no_grad():
            return score_grouped(
                self._model.score, [(p, str(f)) for p, f in items], self.batch_size
            )

    def _score_isolated(self, items: list[tuple[str, Path]]) -> list[float]:
        request = {
            "model": self.name,
            "device": self.device,
            "download_root": self.download_root,
            "batch_size": self.batch_size,
            "items": [[prompt, str(path)] for prompt, path in items],
        }
        scores = self._run([], request, ImageRewardError, None).get("scores")
        if not isinstance(scores, list) or len(scores) != len(items):
            raise ImageRewardError(f"ImageReward worker gave {scores!r} for {len(items)} images")
        return [float(score) for score in scores]

    def _run(
        self,
        args: list[str],
        request: dict[str, Any] | None,
        error: type[ImageRewardError],
        timeout: float | None,
    ) -> dict[str, Any]:
        """The worker's JSON answer (its stdout's last line); on failure its stderr is logged."""
        command = [self.interpreter(), str(WORKER), *args]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        try:
            process = subprocess.run(
                command,
                input="" if request is None else json.dumps(request),
                capture_output=True,
                text=True,
                env={**env, **self.env},
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as expired:
            raise error(f"ImageReward worker {command} took over {timeout} s; {FIX}") from expired
        if process.returncode != 0:
            log.error("ImageReward worker %s failed; its stderr:\n%s", command, process.stderr)
            last = (process.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            hint = (
                f"; {FIX}" if error is ImageRewardUnavailable else " (its stderr is logged above)"
            )
            raise error(
                f"ImageReward worker {command} exited with {process.returncode}: {last}{hint}"
            )
        log.debug("ImageReward worker stderr:\n%s", process.stderr)
        try:
            answer = json.loads(process.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError) as failure:
            raise error(f"ImageReward worker {command} printed no JSON answer") from failure
        if not isinstance(answer, dict):
            raise error(f"ImageReward worker {command} answered {answer!r}")
        return answer
