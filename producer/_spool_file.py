"""The spool's file format: how a slot file is named, marked, laid out and read back.

A spool path names a set of slot files, `<path>`, `<path>.1`, ... `<path>.{N-1}`
(`slot_paths`), one per process that spools on it. A spool file is an SQLite database whose
header carries `APPLICATION_ID`: `check_header` refuses anything else (a directory, a text
file, another application's database) with `NotASpool`, before SQLite opens it, so such a
file is never modified.

One row per job in `jobs`, in the order the jobs were spooled (`sequence`, an
autoincrement): its destination, job id, ordering key, the Kafka-binding headers and the
body exactly as `JobProducer` encoded them (so the job id, the trace context and every other
attribute are published unchanged), its size and when it was spooled. A job the broker
refused for good moves to `refused`, with the reason; a destination the broker refuses for
now is noted in `blocked`.

Rules: a new file is marked (`PRAGMA application_id`) before anything else is written to
it; `connect` opens it in WAL mode with `synchronous=FULL` (each commit is fsynced), and
`with db:` is one IMMEDIATE transaction.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from producer._errors import NotASpool
from schemas import JobMessage, from_kafka, to_kafka

__all__ = [
    "APPLICATION_ID",
    "COLUMNS",
    "Row",
    "SpooledJob",
    "check_header",
    "connect",
    "from_row",
    "slot_paths",
    "to_row",
]

APPLICATION_ID = 0x4A535350
"""`PRAGMA application_id` of a spool file ("JSSP"), at offset 68 of its header."""
_MAGIC = b"SQLite format 3\x00"
_HEADER_SIZE = 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    sequence INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    job_id TEXT NOT NULL,
    key TEXT,
    headers TEXT NOT NULL,
    body BLOB NOT NULL,
    size INTEGER NOT NULL,
    enqueued_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_per_destination ON jobs (destination, sequence);
CREATE TABLE IF NOT EXISTS refused (
    sequence INTEGER PRIMARY KEY,
    destination TEXT NOT NULL,
    job_id TEXT NOT NULL,
    key TEXT,
    headers TEXT NOT NULL,
    body BLOB NOT NULL,
    size INTEGER NOT NULL,
    enqueued_at REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS blocked (
    destination TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    since REAL NOT NULL
);
"""
COLUMNS = "sequence, destination, job_id, key, headers, body, size, enqueued_at"
"""The columns of `jobs` (and the first ones of `refused`), in the order `from_row` reads."""

Row = tuple[str, str, str | None, str, bytes, int, float]
"""A row to insert into `jobs`: destination, job id, key, headers, body, size, enqueued_at."""


@dataclass(frozen=True, slots=True)
class SpooledJob:
    """One waiting job, as the drainer reads it."""

    sequence: int
    """Its place in the spool (FIFO order)."""
    destination: str
    """Its topic (Kafka, memory) or subject (NATS)."""
    message: JobMessage
    """The job as it was encoded: attributes and body."""
    size: int
    """Its encoded size, as counted against `max_bytes`."""


def slot_paths(path: Path, slots: int) -> list[Path]:
    """The slot files of the spool path `path`: `<path>`, `<path>.1`, ... `<path>.{slots-1}`."""
    return [path, *(path.with_name(f"{path.name}.{n}") for n in range(1, slots))]


def check_header(path: Path, header: bytes) -> None:
    """`NotASpool` unless `header` (the first 100 bytes of the file at `path`) is a spool's
    or empty (a file just created)."""
    if not header:
        return
    if len(header) < _HEADER_SIZE or not header.startswith(_MAGIC):
        raise NotASpool(str(path), "not an SQLite database")
    if int.from_bytes(header[68:72], "big") != APPLICATION_ID:
        raise NotASpool(str(path), "an SQLite database of another application")


def connect(path: Path, *, new: bool) -> sqlite3.Connection:
    """Open the spool file `path` (its header checked; `new`: empty, to be marked)."""
    # isolation_level=None: autocommit, except inside `with db:` (an explicit transaction).
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        if new:  # marks the file as a spool before anything else is written
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.executescript(_SCHEMA)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
    except BaseException:
        db.close()
        raise
    db.isolation_level = "IMMEDIATE"  # `with db:` begins IMMEDIATE, commits on exit
    return db


def to_row(destination: str, message: JobMessage) -> Row:
    """The `jobs` row of an encoded job for `destination`."""
    attributes = message.attributes
    key, headers = to_kafka(attributes)
    encoded = json.dumps([[name, value.decode()] for name, value in headers])
    size = len(key or b"") + sum(len(n) + len(v) for n, v in headers) + len(message.body)
    return (destination, attributes.id, attributes.key, encoded, message.body, size, time.time())


def from_row(row: tuple[int, str, str, str | None, str, bytes, int, float]) -> SpooledJob:
    """The job a `jobs` row (`COLUMNS`) holds."""
    sequence, destination, _, key, headers, body, size, _ = row
    pairs = [(str(name), str(value).encode()) for name, value in json.loads(headers)]
    attributes = from_kafka(key.encode() if key is not None else None, pairs)
    return SpooledJob(sequence, destination, JobMessage(attributes, bytes(body)), size)
