"""Cheap checks of files and folders before any work: a safetensors file whose header is intact
and matches its size, a folder that can be written. Each returns what is wrong (None: nothing),
for the caller to raise its own error with the fix."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path


HEADER_LENGTH_BYTES = 8  # a safetensors file: u64 (little-endian) header length, JSON, data
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


def safetensors_problem(path: Path) -> str | None:
    """What makes `path` unreadable as a safetensors file without loading a tensor: missing,
    shorter than its header, a header that is not JSON, or tensors whose data offsets do not
    exactly fill the rest of the file (a truncated or padded file). None when intact."""
    if not path.is_file():
        return "the file is missing"
    size = path.stat().st_size
    if size < HEADER_LENGTH_BYTES:
        return f"{size} bytes, shorter than a safetensors header"
    with path.open("rb") as file:
        (header_length,) = struct.unpack("<Q", file.read(HEADER_LENGTH_BYTES))
        if header_length > min(MAX_HEADER_BYTES, size - HEADER_LENGTH_BYTES):
            return f"its header claims {header_length} bytes of a {size}-byte file"
        raw = file.read(header_length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        end = _data_end(entry.get("data_offsets") if isinstance(entry, dict) else None)
        if end is None:
            return f"tensor {name!r} has no valid data_offsets"
        data_end = max(data_end, end)
    data_bytes = size - HEADER_LENGTH_BYTES - header_length
    if data_end != data_bytes:
        return f"its tensors take {data_end} bytes of data, the file holds {data_bytes}"
    return None


def _data_end(offsets: object) -> int | None:
    """The end of a tensor's `data_offsets` [begin, end] (integers, 0 <= begin <= end), or
    None when they are not that."""
    if not (isinstance(offsets, list) and len(offsets) == 2):
        return None
    begin, end = offsets
    if isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end:
        return end
    return None


def unwritable_folder_problem(path: Path) -> str | None:
    """What keeps `path` from being a folder files can be written into (created where missing):
    it or a parent is a file, or the nearest existing folder refuses a new file (permissions, a
    read-only file system). Probed by creating and removing a temporary file there. None when
    it can be written."""
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            return f"no existing folder above {path}"
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        handle, probe = tempfile.mkstemp(prefix=".obsdiff-write-check-", dir=existing)
    except OSError as err:
        return f"{existing} cannot be written ({err.strerror or err})"
    os.close(handle)
    os.unlink(probe)
    return None
