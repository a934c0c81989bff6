"""Weights & Biases tracking: online with a key, offline without one, disabled in tests.

A thin wrapper so that apps log configs, metrics, image grids and tables in one way, and tests
can run the real offline code path. Every run also writes `results.json` itself, whatever W&B.
"""

from __future__ import annotations

import os
import secrets
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image


MODES = ("auto", "online", "offline", "disabled")
RUN_ID_FILE = "run-id.txt"


def resolve_mode(mode: str) -> str:
    """`auto`: online when an API key is configured (WANDB_API_KEY or ~/.netrc), else offline;
    WANDB_MODE in the environment wins (the tests set it to disabled)."""
    if mode not in MODES:
        raise ValueError(f"tracking.mode={mode!r}; use one of {', '.join(MODES)}")
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode != "auto":
        return mode
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    )
    return "online" if has_key else "offline"


class WandbLogger:
    def __init__(
        self,
        project: str,
        directory: Path,
        mode: str = "auto",
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        config: dict[str, Any] | None = None,
    ) -> None:
        import wandb

        self.mode = resolve_mode(mode)
        directory.mkdir(parents=True, exist_ok=True)
        run_id = self.run_id(directory)
        self.run = wandb.init(
            id=run_id,
            resume="allow",  # a resumed run directory continues its W&B run
            project=project,
            entity=entity,
            dir=str(directory),
            mode=self.mode,  # type: ignore[arg-type]
            name=name,
            group=group,
            tags=list(tags),
            config=config or {},
            reinit="finish_previous",
        )

    def lightning(self) -> Any:
        """This run as Lightning's WandbLogger, for the Lightning loops (Fabric's `loggers`):
        they log into the same W&B run."""
        from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

        return LightningWandbLogger(experiment=self.run)

    @staticmethod
    def run_id(directory: Path) -> str:
        """The W&B run id of the run directory: made on its first start and kept in
        `wandb/run-id.txt`, so that a run interrupted and resumed is one W&B run."""
        stored = directory / "wandb" / RUN_ID_FILE
        if stored.is_file() and stored.read_text().strip():
            return stored.read_text().strip()
        alphabet = string.ascii_lowercase + string.digits  # W&B's own ids: 8 of these
        run_id = "".join(secrets.choice(alphabet) for _ in range(8))
        stored.parent.mkdir(parents=True, exist_ok=True)
        stored.write_text(run_id + "\n")
        return run_id

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def log_images(self, key: str, images: Sequence[Image.Image], captions: Sequence[str]) -> None:
        import wandb

        self.run.log(
            {key: [wandb.Image(i, caption=c) for i, c in zip(images, captions, strict=True)]}
        )

    def log_image_file(self, key: str, path: Path, caption: str = "") -> None:
        import wandb

        with Image.open(path) as image:
            self.run.log({key: wandb.Image(image.convert("RGB"), caption=caption)})

    def set_summary(self, metrics: dict[str, Any]) -> None:
        """Final values shown in the runs table (and compared across a group)."""
        for key, value in metrics.items():
            self.run.summary[key] = value

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        import wandb

        self.run.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def finish(self, status: str = "completed") -> None:
        """End the run; anything but `completed` (failed, interrupted) ends it with exit code 1,
        which W&B shows as a failed run, and `status` goes to the summary."""
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status == "completed" else 1)
