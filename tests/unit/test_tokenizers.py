"""The in-code tokenizers encode, pad and survive save_pretrained / from_pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from obsdiff.models.tiny import CLIP_VOCAB_SIZE, char_clip_tokenizer, char_t5_tokenizer


pytestmark = pytest.mark.unit


def test_clip_tokenizer_is_one_token_per_character() -> None:
    tok = char_clip_tokenizer()
    assert len(tok) == CLIP_VOCAB_SIZE
    ids = tok("a cat").input_ids
    assert ids[0] == tok.bos_token_id == 0
    assert ids[-1] == tok.eos_token_id == 1
    assert len(ids) == len("a cat") - 1 + 2  # spaces are absorbed into the next word's token
    padded = tok("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a cat"


def test_t5_tokenizer_uses_t5_special_ids() -> None:
    tok = char_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("A red Circle.").input_ids
    assert ids[-1] == 1 and 2 not in ids  # no unknown pieces for letters and punctuation


@pytest.mark.parametrize("make", [char_clip_tokenizer, char_t5_tokenizer])
def test_tokenizers_round_trip_through_files(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tok = make()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = ["a small red circle in the top left", "Hello, world!"]
    assert loaded(text).input_ids == tok(text).input_ids
