"""Calibration and evaluation prompt files.

Formats: Conceptual Captions TSV (caption in the first column, the GCC3M file the paper uses,
with or without a header), plain text (one prompt per line), CSV or JSONL with a named column,
COCO captions JSON (`annotations[].caption`). Prompts are taken first-N in file order (the
reference code) or as a seeded random sample; the file and the selection are recorded by sha256.
Every problem is reported before any model is loaded.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


BUNDLED_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "calibration_prompts.txt"
FORMATS = ("auto", "tsv", "txt", "csv", "jsonl", "coco")
SELECTIONS = ("first", "random")


class PromptFileError(ValueError):
    """A prompt file is missing, unreadable, empty, or holds too few prompts."""


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prompts_record(prompts: list[str], source: str, file_hash: str) -> dict[str, Any]:
    """What a result file records of a prompt set: where from, and hashes of file and prompts."""
    return {
        "source": source,
        "file_sha256": file_hash,
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        "num_prompts": len(prompts),
    }


@dataclass(frozen=True)
class PromptSet:
    prompts: list[str]
    source: str
    file_sha256: str
    selection: str
    seed: int | None

    def describe(self) -> dict[str, Any]:
        record = prompts_record(self.prompts, self.source, self.file_sha256)
        return {**record, "selection": self.selection, "seed": self.seed}


def _detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".tsv": "tsv", ".txt": "txt", ".csv": "csv", ".jsonl": "jsonl", ".json": "coco"}.get(
        suffix, "txt"
    )


def _read(path: Path, fmt: str, column: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if fmt == "txt":
        return [line.strip() for line in text.splitlines()]
    if fmt == "tsv":
        rows = [line.split("\t")[0].strip() for line in text.splitlines()]
        if rows and rows[0].lower() == column.lower():  # a header line
            rows = rows[1:]
        return rows
    if fmt == "csv":
        reader = csv.DictReader(text.splitlines())
        if column not in (reader.fieldnames or []):
            raise PromptFileError(
                f"{path}: no column {column!r} (columns: {reader.fieldnames}); set the column name"
            )
        return [str(row[column]).strip() for row in reader]
    if fmt == "jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if column not in record:
                raise PromptFileError(f"{path}:{number}: no key {column!r}; set the column name")
            prompts.append(str(record[column]).strip())
        return prompts
    data = json.loads(text)  # coco
    if not isinstance(data, dict) or "annotations" not in data:
        raise PromptFileError(f"{path}: not a COCO captions file (no 'annotations' list)")
    return [str(a["caption"]).strip() for a in data["annotations"]]


def load_prompts(
    path: str | Path,
    num_prompts: int | None = None,
    fmt: str = "auto",
    column: str = "caption",
    selection: str = "first",
    seed: int = 0,
) -> PromptSet:
    """Read `path` and select `num_prompts` (all when None), first-N or a seeded random sample."""
    if fmt not in FORMATS:
        raise PromptFileError(f"prompt format {fmt!r} is unknown; use one of {FORMATS}")
    if selection not in SELECTIONS:
        raise PromptFileError(f"prompt selection {selection!r} is unknown; use one of {SELECTIONS}")
    file = Path(path).expanduser()
    if not file.is_file():
        raise PromptFileError(
            f"prompt file {str(file)!r} does not exist; point the config at a caption file "
            f"(the bundled demo set is {BUNDLED_PROMPTS})"
        )
    fmt = _detect_format(file) if fmt == "auto" else fmt
    try:
        prompts = [p for p in _read(file, fmt, column) if p]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError) as err:
        raise PromptFileError(f"{file}: cannot read it as {fmt}: {err}") from err
    if not prompts:
        raise PromptFileError(f"prompt file {str(file)!r} holds no prompts")
    if num_prompts is not None:
        if num_prompts < 1:
            raise PromptFileError(f"num_prompts={num_prompts} must be >= 1")
        if num_prompts > len(prompts):
            raise PromptFileError(
                f"{file} holds {len(prompts)} prompts but {num_prompts} were asked for; lower "
                "num_prompts or use a larger file"
            )
        if selection == "first":
            prompts = prompts[:num_prompts]
        else:
            prompts = random.Random(seed).sample(prompts, num_prompts)
    return PromptSet(
        prompts=prompts,
        source=str(file),
        file_sha256=file_sha256(file),
        selection=selection,
        seed=seed if selection == "random" else None,
    )
