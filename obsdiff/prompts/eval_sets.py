"""Evaluation prompt sets: numbered prompts, recorded by sha256, disjoint from calibration.

Sources: MS-COCO 2014 val captions (`captions_val2014.json`; one caption per image, the first in
file order, then a seeded sample of images: the paper's 5K and 1K subsets), PartiPrompts /
DrawBench-style TSV (column `Prompt`), plain text, and the bundled demo prompts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from obsdiff.prompts.files import (
    PromptFileError,
    file_sha256,
    load_prompts,
    prompts_record,
)


@dataclass(frozen=True)
class EvalPrompts:
    """Prompts with stable ids (the id fixes the noise seed of its image)."""

    ids: list[int]
    prompts: list[str]
    source: str
    file_sha256: str

    def describe(self) -> dict[str, Any]:
        return prompts_record(self.prompts, self.source, self.file_sha256)

    def repeated(self, images_per_prompt: int) -> EvalPrompts:
        """Each prompt `images_per_prompt` times: image j of prompt id i gets id i * n + j (so
        its own seed, seed + id); with n = 1 the set itself (ids unchanged)."""
        n = images_per_prompt
        if n < 1:
            raise ValueError(f"eval.images_per_prompt={n} must be >= 1")
        if n == 1:
            return self
        return EvalPrompts(
            ids=[i * n + j for i in self.ids for j in range(n)],
            prompts=[p for p in self.prompts for _ in range(n)],
            source=self.source,
            file_sha256=self.file_sha256,
        )

    def check_disjoint(self, calibration: list[str]) -> None:
        """Evaluation prompts must not be calibration prompts."""
        shared = set(self.prompts) & set(calibration)
        if shared:
            raise PromptFileError(
                f"{len(shared)} evaluation prompts are also calibration prompts (e.g. "
                f"{sorted(shared)[0]!r}); use disjoint sets"
            )


def coco_captions(path: str | Path, num_prompts: int | None, seed: int = 0) -> EvalPrompts:
    """One caption per image of a COCO captions file, `num_prompts` images sampled with `seed`;
    ids are the COCO image ids."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise PromptFileError(
            f"COCO captions file {str(file)!r} does not exist; download captions_val2014.json "
            "(annotations_trainval2014.zip) and set eval.prompts.path (or paths.data_root) to it"
        )
    data = json.loads(file.read_text())
    if "annotations" not in data:
        raise PromptFileError(f"{file}: not a COCO captions file (no 'annotations' list)")
    first: dict[int, str] = {}
    for annotation in data["annotations"]:
        first.setdefault(int(annotation["image_id"]), str(annotation["caption"]).strip())
    image_ids = sorted(first)
    if num_prompts is not None:
        if num_prompts > len(image_ids):
            raise PromptFileError(
                f"{file} has {len(image_ids)} images, {num_prompts} were asked for"
            )
        image_ids = sorted(random.Random(seed).sample(image_ids, num_prompts))
    return EvalPrompts(
        ids=image_ids,
        prompts=[first[i] for i in image_ids],
        source=str(file),
        file_sha256=file_sha256(file),
    )


def prompt_file(
    path: str | Path, num_prompts: int | None = None, fmt: str = "auto", column: str = "Prompt"
) -> EvalPrompts:
    """A TSV (PartiPrompts: column `Prompt`), text, CSV or JSONL file, first N; ids 0..N-1."""
    loaded = load_prompts(path, num_prompts=num_prompts, fmt=fmt, column=column)
    return EvalPrompts(
        ids=list(range(len(loaded.prompts))),
        prompts=loaded.prompts,
        source=loaded.source,
        file_sha256=loaded.file_sha256,
    )
