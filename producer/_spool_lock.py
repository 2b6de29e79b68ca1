"""One owner per spool slot file: the `flock`, and this process's record of what it owns.

Rules:

- The lock is an exclusive, non-blocking `flock` on the database file itself (independent
  of SQLite's POSIX locks on Linux), taken before SQLite opens it (`lock`). It goes with
  the process.
- `owning` serialises taking a slot in this process; `owned` maps (device, inode) to the
  `SpoolFile` that owns it, and `owned_here` holds the same keys for readers below
  `SpoolFile` (`read_spool_status`): a reader here never opens (and closes) a descriptor
  of its own on an owned file, as closing any descriptor of a file drops every POSIX lock
  this process holds on it, SQLite's included.
- A forked child drops its copies (`forget_after_fork`, registered with
  `os.register_at_fork`) and never uses the parent's spool: it opens a slot of its own.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path
from typing import Protocol

from producer._errors import NotASpool

__all__ = ["Owner", "inode", "key", "lock", "owned", "owned_here", "owning", "unlock"]

FileKey = tuple[int, int]
"""(device, inode) of a file."""


class Owner(Protocol):
    """What owns a slot file in this process (a `SpoolFile`)."""

    def forget_after_fork(self) -> None: ...


owning = threading.Lock()  # one `SpoolFile.take` at a time in this process
owned: dict[FileKey, Owner] = {}
owned_here: set[FileKey] = set()
"""(device, inode) of the spool files a `SpoolFile` of this process owns. A reader here
never opens (and closes) a descriptor of its own on them: closing any descriptor of a file
drops every POSIX lock this process holds on it, SQLite's included."""


def inode(path: Path) -> FileKey | None:
    """(device, inode) of the file at `path`, or None if there is none."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


def key(fd: int) -> FileKey:
    """(device, inode) of the open file `fd`."""
    found = os.fstat(fd)
    return found.st_dev, found.st_ino


def lock(slot: Path, *, create: bool) -> tuple[int, bool] | None:
    """A descriptor of `slot` under this process's exclusive `flock`, and whether this call
    created the file; None if it does not exist (and `create` is false) or another holds
    the lock. `NotASpool` if it is a directory."""
    fd, created = _open_fd(slot, create=create)
    if fd < 0:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)  # this process holds no other lock on the file (`owned`)
        return None
    return fd, created


def unlock(fd: int) -> None:
    """Release the `flock` and close `fd`."""
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _open_fd(slot: Path, *, create: bool) -> tuple[int, bool]:
    """A descriptor of `slot` (-1 if it does not exist and `create` is false), and whether
    this call created the file."""
    flags = os.O_RDWR | os.O_CLOEXEC
    if create:
        slot.parent.mkdir(parents=True, exist_ok=True)
        try:
            return os.open(slot, flags | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            pass
    try:
        return os.open(slot, flags), False
    except FileNotFoundError:
        return -1, False
    except IsADirectoryError:
        raise NotASpool(str(slot), "a directory") from None


def _forget_after_fork() -> None:
    for spool in list(owned.values()):
        spool.forget_after_fork()
    owned.clear()
    owned_here.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
