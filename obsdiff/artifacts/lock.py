"""One process at a time in a run directory.

A run holds `<run dir>/run.lock` while it works: an exclusive `flock` on the file, which also
records the holder (process id, host, start). A second process that tries the same directory
is refused at once, naming the holder. The operating system releases the lock of a process that
dies (kill -9 included), so a later run takes the directory over and says whose lock it was.
The processes a run starts itself (Lightning's data-parallel ranks re-run the same command in
the same directory) inherit the holder's id in `RUN_LOCK_HOLDER` and work under its lock.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path


log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
RUN_LOCK_HOLDER = "OBSDIFF_RUN_LOCK_HOLDER"  # `<pid>:<run dir>` of the holder, for its children


class RunDirectoryBusy(ValueError):
    """Another process works in the run directory."""


@dataclass(frozen=True)
class Holder:
    """Who holds a run directory."""

    pid: int
    host: str
    since: str

    def __str__(self) -> str:
        return f"process {self.pid} on {self.host} (since {self.since})"


class RunLock:
    """The lock of one run directory (`acquire`, `release`; a context manager)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Hold the directory, or raise RunDirectoryBusy naming the process that holds it."""
        fd = self._lock_file()
        if fd is None:
            holder = self.holder()
            if holder is not None and self._held_for_me(holder):
                return  # a rank started by the holder works under the holder's lock
            who = "another process" if holder is None else str(holder)
            raise RunDirectoryBusy(
                f"{self.directory} is in use by {who}; nothing was changed there. Wait for it "
                "to finish, or start this run in its own directory (leave hydra.run.dir out)."
            )
        previous = self.holder()
        if previous is not None and previous.pid != os.getpid():
            log.warning(
                "%s: took over the lock of %s, which no longer runs", self.directory, previous
            )
        me = Holder(os.getpid(), socket.gethostname(), datetime.now().isoformat(timespec="seconds"))
        try:  # who holds it, for the message of a refused process (a full disk: unknown)
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(asdict(me)) + "\n").encode(), 0)
        except OSError:
            pass
        self._fd = fd
        os.environ[RUN_LOCK_HOLDER] = f"{me.pid}:{self.directory.resolve()}"

    def _lock_file(self) -> int | None:
        """The lock file, opened and locked (None: another process holds it). A file that its
        holder removed between our open and our lock is not the lock any more: open again."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _held_for_me(self, holder: Holder) -> bool:
        return os.environ.get(RUN_LOCK_HOLDER) == f"{holder.pid}:{self.directory.resolve()}"

    def holder(self) -> Holder | None:
        """Who the lock file names (None: nobody, or a file that cannot be read)."""
        try:
            data = json.loads(self.path.read_text())
            return Holder(int(data["pid"]), str(data["host"]), str(data["since"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def release(self) -> None:
        """Remove the lock file and let the directory go (nothing when not held here)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        if os.environ.get(RUN_LOCK_HOLDER, "").startswith(f"{os.getpid()}:"):
            del os.environ[RUN_LOCK_HOLDER]

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
