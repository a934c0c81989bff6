"""Prompt files: every format, first-N or seeded sample, sha256 records, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from obsdiff.prompts.files import BUNDLED_PROMPTS, PromptFileError, load_prompts


pytestmark = pytest.mark.unit

CAPTIONS = ["a red bus", "two cats on a sofa", "a boat at sea", "a snowy street"]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("header", [False, True])
def test_conceptual_captions_tsv(tmp_path: Path, header: bool) -> None:
    lines = [f"{c}\thttp://example.invalid/{i}.jpg" for i, c in enumerate(CAPTIONS)]
    text = ("caption\turl\n" if header else "") + "\n".join(lines) + "\n"
    prompts = load_prompts(write(tmp_path, "gcc3m.tsv", text), num_prompts=3)
    assert prompts.prompts == CAPTIONS[:3]


def test_text_csv_jsonl_and_coco(tmp_path: Path) -> None:
    txt = write(tmp_path, "p.txt", "\n".join(CAPTIONS) + "\n\n")
    csv = write(
        tmp_path, "p.csv", "id,text\n" + "\n".join(f'{i},"{c}"' for i, c in enumerate(CAPTIONS))
    )
    jsonl = write(tmp_path, "p.jsonl", "\n".join(json.dumps({"text": c}) for c in CAPTIONS))
    coco = write(
        tmp_path,
        "captions_val2014.json",
        json.dumps(
            {"annotations": [{"image_id": i, "caption": c} for i, c in enumerate(CAPTIONS)]}
        ),
    )
    assert load_prompts(txt).prompts == CAPTIONS
    assert load_prompts(csv, column="text").prompts == CAPTIONS
    assert load_prompts(jsonl, column="text").prompts == CAPTIONS
    assert load_prompts(coco).prompts == CAPTIONS
    with pytest.raises(PromptFileError, match="no column 'caption'"):
        load_prompts(csv)


def test_selection_and_records(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", "\n".join(CAPTIONS))
    first = load_prompts(path, num_prompts=2)
    sample = load_prompts(path, num_prompts=2, selection="random", seed=3)
    again = load_prompts(path, num_prompts=2, selection="random", seed=3)
    assert sample.prompts == again.prompts and set(sample.prompts) <= set(CAPTIONS)
    record = first.describe()
    assert record["num_prompts"] == 2 and len(record["file_sha256"]) == 64
    assert (
        record["prompts_sha256"] != sample.describe()["prompts_sha256"]
        or first.prompts == sample.prompts
    )
    assert len(load_prompts(BUNDLED_PROMPTS).prompts) >= 16


def test_errors_come_before_anything_is_loaded(tmp_path: Path) -> None:
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompts(tmp_path / "missing.tsv")
    with pytest.raises(PromptFileError, match="holds no prompts"):
        load_prompts(write(tmp_path, "empty.txt", "\n\n"))
    with pytest.raises(PromptFileError, match="holds 4 prompts but 100 were asked for"):
        load_prompts(write(tmp_path, "p.txt", "\n".join(CAPTIONS)), num_prompts=100)
    with pytest.raises(PromptFileError, match="format"):
        load_prompts(write(tmp_path, "q.txt", "a"), fmt="parquet")
