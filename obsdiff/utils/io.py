"""Atomic file writes: a crash or Ctrl-C never leaves half a file behind, and a write the
filesystem refuses (no space, a quota, permissions) is one `WriteError` naming the file and the
bytes it needed, with the half-written temporary file removed."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch


# A write the filesystem refuses: no space, a quota, a read-only filesystem, permissions.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
# Raised by anything, not only a write: only these count as the filesystem's refusal unnamed.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


class WriteError(OSError):
    """A file could not be written: its path, the bytes it needed (None: unknown) and why."""

    def __init__(self, path: Path, needed: int | None, reason: str, code: int | None = None):
        super().__init__(code, reason, str(path))
        self.path, self.needed, self.reason = path, needed, reason

    def __str__(self) -> str:
        size = "" if self.needed is None else f" ({self.needed:,} bytes)"
        return f"could not write {self.path}{size}: {self.reason}"


def is_write_failure(err: BaseException) -> bool:
    """A refusal of the filesystem (no space, quota, read-only, permissions on a write)."""
    return isinstance(err, WriteError) or (isinstance(err, OSError) and err.errno in FULL_ERRNOS)


def free_bytes(path: Path) -> int:
    """The bytes free on the filesystem that holds `path` (or the nearest folder above it)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def _refusal(err: Exception) -> tuple[int | None, str] | None:
    """(errno, reason) when `err` is the filesystem refusing a write, else None (a bug)."""
    if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
        return err.errno, err.strerror or str(err)
    text = str(err)  # safetensors reports its I/O errors as text: `IoError(Os { code: 28, ...`
    if isinstance(err, safetensors.SafetensorError) and "IoError" in text:
        code = next((c for c in WRITE_ERRNOS if f"code: {c}," in text), None)
        return code, (os.strerror(code) if code is not None else text)
    return None


def _atomic(path: Path, tmp: Path, needed: int, write: Callable[[], object]) -> None:
    """`write()` into `tmp`, then `tmp` replaces `path`. A write the filesystem refuses
    removes `tmp` and is a WriteError (with the space left, when it is full); any other
    error passes through as it is."""
    try:
        write()
        os.replace(tmp, path)
    except (OSError, safetensors.SafetensorError) as err:
        tmp.unlink(missing_ok=True)
        refusal = _refusal(err)
        if refusal is None:
            raise
        code, reason = refusal
        if code in (errno.ENOSPC, errno.EDQUOT):
            reason += f" ({free_bytes(path.parent):,} bytes free there)"
        raise WriteError(path, needed, reason, code) from err


def write_text(path: Path, text: str) -> None:
    """Write atomically (a crash never leaves half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    data = text.encode()
    _atomic(path, tmp, len(data), lambda: tmp.write_bytes(data))


def write_json(path: Path, data: dict[str, Any]) -> None:
    """JSON, written atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors file, written atomically, tensors moved to the CPU."""
    tmp = path.with_suffix(".tmp")
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    needed = sum(t.numel() * t.element_size() for t in cpu.values())
    _atomic(path, tmp, needed, lambda: safetensors.torch.save_file(cpu, str(tmp)))
