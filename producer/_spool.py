"""The durable spool: a locked slot file of encoded jobs that wait for the broker
(`SpoolFile`, blocking), and its async face (`Spool`).

A process owns the first slot file of a spool path that no other process owns
(`SpoolFile.open`), so the workers of one server share the setting, and a restarted process
takes the lowest free slot, with the jobs its predecessor left. A drainer also takes
(`SpoolFile.take`) sibling slots that no process owns and that hold jobs, to publish them.
The FIFO is per destination (a key lives in one destination): `head(destination, ...)`.
The file format is `producer._spool_file`; the lock, `producer._spool_lock`.

Guarantees:

- `append` returns only after the rows are committed durably: SQLite in WAL mode with
  `synchronous=FULL` (each commit is fsynced). A crash after it loses nothing.
- One process owns a slot file at a time: an exclusive `flock` on the database file itself,
  taken before SQLite opens it. A forked child drops its copy and never uses the parent's
  spool: it opens a slot of its own.
- A file that is not a spool (`PRAGMA application_id`, checked in the raw header before
  SQLite opens it) raises `NotASpool` and is left as it was.
- The bounds (`max_jobs`, `max_bytes`) are checked before anything is written: over them,
  `SpoolFull` and nothing is stored.
- `Spool` (the async face) runs every SQLite call on one thread (its sender's), never on the
  event loop, in the order they were made.

SQLite through the standard library's `sqlite3`: no dependency to add, a file format
that is stable and readable by any `sqlite3` tool, and transactions that survive a crash
(docs/producer.md, "The spool").
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from producer import _spool_lock as locks
from producer._errors import SpoolFull, SpoolLocked
from producer._settings import SpoolSettings
from producer._spool_file import (
    COLUMNS,
    SpooledJob,
    check_header,
    connect,
    from_row,
    slot_paths,
    to_row,
)
from producer._spool_status import SpoolStatus, spool_status
from schemas import JobMessage

__all__ = ["Spool", "SpoolFile", "SpooledJob"]

T = TypeVar("T")

_inherited: list[sqlite3.Connection] = []
"""A forked child's copies of its parent's connections: never closed (nor collected), as
closing them could checkpoint or unlock the parent's database."""


class SpoolFile:
    """An open, locked spool slot file. Blocking calls: use it from one thread (`Spool`)."""

    def __init__(self, path: Path, settings: SpoolSettings, lock_fd: int) -> None:
        """Use `SpoolFile.open` or `SpoolFile.take`."""
        self.path = path
        self._settings = settings
        self._lock_fd = lock_fd
        self._pid = os.getpid()
        self._db: sqlite3.Connection | None = None
        self.jobs = 0
        """Jobs waiting now (kept in step with the file: this process owns it)."""
        self.bytes = 0
        """Their encoded size, in bytes."""
        self.waiting: dict[str, int] = {}
        """Jobs waiting per destination (only destinations with jobs)."""
        self.blocked: dict[str, str] = {}
        """Destinations the broker refuses for now, with the reason (the `blocked` table)."""

    @classmethod
    def open(cls, path: Path, settings: SpoolSettings) -> SpoolFile:
        """Own the first free slot file of the spool path `path` (created if need be):
        `SpoolLocked` if other processes own all `settings.max_processes` of them,
        `NotASpool` if one is not a spool, `OSError`/`sqlite3.Error` if it cannot be
        opened."""
        for slot in slot_paths(path, settings.max_processes):
            spool = cls.take(slot, settings, create=True)
            if spool is not None:
                return spool
        raise SpoolLocked(str(path), settings.max_processes)

    @classmethod
    def take(cls, slot: Path, settings: SpoolSettings, *, create: bool) -> SpoolFile | None:
        """Lock and open the slot file `slot`; None if a process (this one included) owns
        it, or if it does not exist and `create` is false. `NotASpool` (the file is left
        as it was) if it is not a spool."""
        with locks.owning:
            if locks.inode(slot) in locks.owned:
                return None
            locked = locks.lock(slot, create=create)
            if locked is None:
                return None
            fd, created = locked
            spool = cls(slot, settings, fd)
            try:
                if locks.inode(slot) != locks.key(fd):  # removed or replaced before it was locked
                    spool.close()
                    return None
                check_header(slot, os.pread(fd, 100, 0))
                spool._db = connect(slot, new=os.fstat(fd).st_size == 0)
                spool._load()
            except BaseException:
                spool.close()
                if created:
                    slot.unlink(missing_ok=True)
                raise
            locks.owned[locks.key(fd)] = spool
            locks.owned_here.add(locks.key(fd))
            return spool

    def append(self, items: Sequence[tuple[str, JobMessage]]) -> None:
        """Store `items` (destination, encoded job) at the end, durably; `SpoolFull` (and
        nothing stored) if they do not fit within the bounds."""
        rows = [to_row(destination, message) for destination, message in items]
        size = sum(row[5] for row in rows)
        settings = self._settings
        if self.jobs + len(rows) > settings.max_jobs:
            raise SpoolFull(str(self.path), f"{self.jobs} of {settings.max_jobs} jobs")
        if self.bytes + size > settings.max_bytes:
            raise SpoolFull(str(self.path), f"{self.bytes} of {settings.max_bytes} bytes")
        db = self._open()
        with db:  # one transaction, committed (and fsynced) on exit
            db.executemany(
                "INSERT INTO jobs (destination, job_id, key, headers, body, size, enqueued_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        self.jobs += len(rows)
        self.bytes += size
        for destination, *_ in rows:
            self.waiting[destination] = self.waiting.get(destination, 0) + 1

    def head(self, destination: str, limit: int) -> list[SpooledJob]:
        """The first `limit` jobs waiting for `destination`, oldest first."""
        rows = self._open().execute(
            f"SELECT {COLUMNS} FROM jobs WHERE destination = ? "  # noqa: S608 - constants
            "ORDER BY sequence LIMIT ?",
            (destination, limit),
        )
        jobs = [from_row(row) for row in rows]
        if not jobs:
            self.waiting.pop(destination, None)
        return jobs

    def delete(self, jobs: Sequence[SpooledJob]) -> None:
        """Remove `jobs` (published), durably."""
        db = self._open()
        with db:
            marks = ",".join("?" * len(jobs))
            db.execute(
                f"DELETE FROM jobs WHERE sequence IN ({marks})",  # noqa: S608 - constants
                tuple(job.sequence for job in jobs),
            )
        self._forget(jobs)

    def refuse(self, job: SpooledJob, reason: str) -> None:
        """Move `job` to the `refused` table with `reason` (a permanent error)."""
        db = self._open()
        with db:
            db.execute(
                f"INSERT INTO refused ({COLUMNS}, reason) "  # noqa: S608 - constants
                f"SELECT {COLUMNS}, ? FROM jobs WHERE sequence = ?",
                (reason, job.sequence),
            )
            db.execute("DELETE FROM jobs WHERE sequence = ?", (job.sequence,))
        self._forget([job])

    def block(self, destination: str, reason: str) -> None:
        """Note that the broker refuses jobs for `destination` for now, and why."""
        with self._open() as db:
            db.execute(
                "INSERT OR REPLACE INTO blocked (destination, reason, since) VALUES (?, ?, ?)",
                (destination, reason, time.time()),
            )
        self.blocked[destination] = reason

    def unblock(self, destination: str) -> None:
        """Forget that `destination` was blocked (it takes jobs again, or none wait)."""
        with self._open() as db:
            db.execute("DELETE FROM blocked WHERE destination = ?", (destination,))
        self.blocked.pop(destination, None)

    def status(self) -> SpoolStatus:
        """What the file holds now."""
        return spool_status(self._open(), str(self.path))

    def close(self) -> None:
        """Close the database, then release the lock (in that order: closing a descriptor
        of the file drops this process's POSIX locks on it, SQLite's). Idempotent."""
        db, self._db = self._db, None
        if db is not None:
            db.close()
        fd, self._lock_fd = self._lock_fd, -1
        if fd >= 0:
            key = locks.key(fd)
            if locks.owned.get(key) is self:
                del locks.owned[key]
                locks.owned_here.discard(key)
            locks.unlock(fd)

    def forget_after_fork(self) -> None:
        """In a forked child: drop the inherited descriptor (not the parent's lock, which
        an unlock would release) and never touch the parent's database again."""
        if self._db is not None:
            _inherited.append(self._db)
            self._db = None
        fd, self._lock_fd = self._lock_fd, -1
        if fd >= 0:
            os.close(fd)

    def _load(self) -> None:
        db = self._open()
        per = db.execute(
            "SELECT destination, count(*), coalesce(sum(size), 0) FROM jobs GROUP BY destination"
        ).fetchall()
        self.waiting = {str(d): int(n) for d, n, _ in per}
        self.jobs = sum(self.waiting.values())
        self.bytes = sum(int(size) for *_, size in per)
        self.blocked = {
            str(d): str(r) for d, r in db.execute("SELECT destination, reason FROM blocked")
        }

    def _forget(self, jobs: Sequence[SpooledJob]) -> None:
        for job in jobs:
            left = self.waiting.get(job.destination, 0) - 1
            if left > 0:
                self.waiting[job.destination] = left
            else:
                self.waiting.pop(job.destination, None)
        self.jobs -= len(jobs)
        self.bytes -= sum(job.size for job in jobs)

    def _open(self) -> sqlite3.Connection:
        if self._pid != os.getpid():
            msg = f"the spool {self.path} belongs to the process that forked this one"
            raise RuntimeError(msg)
        if self._db is None:
            msg = f"the spool {self.path} is closed"
            raise RuntimeError(msg)
        return self._db


class Spool:
    """The async face of a `SpoolFile`: each call runs on `executor` (one thread, shared by
    the spools of one sender, which shuts it down)."""

    def __init__(self, file: SpoolFile, executor: ThreadPoolExecutor) -> None:
        self._file = file
        self._executor = executor

    @property
    def path(self) -> Path:
        return self._file.path

    @property
    def jobs(self) -> int:
        """Jobs waiting (including those the drainer is publishing right now)."""
        return self._file.jobs

    @property
    def waiting(self) -> dict[str, int]:
        """Jobs waiting per destination."""
        return self._file.waiting

    @property
    def blocked(self) -> dict[str, str]:
        """Destinations the broker refuses for now, with the reason."""
        return self._file.blocked

    async def append(self, items: Sequence[tuple[str, JobMessage]]) -> None:
        """`SpoolFile.append` off the event loop."""
        await self._call(lambda: self._file.append(items))

    async def head(self, destination: str, limit: int) -> list[SpooledJob]:
        return await self._call(lambda: self._file.head(destination, limit))

    async def delete(self, jobs: Sequence[SpooledJob]) -> None:
        await self._call(lambda: self._file.delete(jobs))

    async def refuse(self, job: SpooledJob, reason: str) -> None:
        await self._call(lambda: self._file.refuse(job, reason))

    async def block(self, destination: str, reason: str) -> None:
        await self._call(lambda: self._file.block(destination, reason))

    async def unblock(self, destination: str) -> None:
        await self._call(lambda: self._file.unblock(destination))

    async def status(self) -> SpoolStatus:
        return await self._call(self._file.status)

    async def close(self) -> None:
        """Close the file and release its lock. Idempotent."""
        await self._call(self._file.close)

    async def _call(self, function: Callable[[], T]) -> T:
        # Shielded: a cancelled caller must not leave a commit half-observed; the thread
        # finishes the call either way, and the counts stay in step with the file.
        future = asyncio.get_running_loop().run_in_executor(self._executor, function)
        return await asyncio.shield(future)
