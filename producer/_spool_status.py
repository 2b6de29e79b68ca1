"""What a spool's files hold (`SpoolStatus`), read by their owner or, without their locks,
by `jobstream spool status` (`read_spool_status`: SQLite lets a reader in while a producer
writes, in WAL mode).

Rules: a slot file that is not a spool (`check_header`, `producer._spool_file`) raises
`NotASpool` and is never modified (a reader opens it read-only); a file this process owns
is read through SQLite only, never through a descriptor of its own (`owned_here`,
`producer._spool_lock`).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import NamedTuple

from producer._errors import NotASpool
from producer._spool_file import check_header, slot_paths
from producer._spool_lock import inode, owned_here

__all__ = ["SpoolStatus", "read_spool_status", "spool_status"]

DEFAULT_SLOTS = 16
"""`spool.max_processes` by default."""


class SpoolStatus(NamedTuple):
    """What a spool holds: one slot file (its owner's view) or all of them (`spool status`)."""

    path: str
    """The spool path."""
    jobs: int
    """Jobs waiting to be published."""
    bytes: int
    """Their encoded size (headers + body), in bytes."""
    oldest_age_s: float | None
    """Seconds since the oldest waiting job was spooled (None: none waits)."""
    destinations: dict[str, int]
    """Waiting jobs per topic (Kafka, memory) or subject (NATS)."""
    refused: int
    """Jobs the broker refused for good while draining, kept in the `refused` table."""
    blocked: dict[str, str]
    """Destinations whose jobs cannot be published although the broker is reachable (a
    missing topic or stream: `jobstream topics ensure`), with the broker's reason. Their
    jobs stay and are retried; jobs for other destinations are not held up."""
    slots: list[str]
    """The slot files read."""


def read_spool_status(path: Path, slots: int = DEFAULT_SLOTS) -> SpoolStatus:
    """What the spool path `path` holds, in every slot file that exists (`slots`:
    `spool.max_processes`), read without their locks (producers may own them). A path with
    no slot file holds nothing; `NotASpool` if one is not a spool (nothing is modified)."""
    found = []
    for slot in slot_paths(path, slots):
        if slot.is_dir():
            raise NotASpool(str(slot), "a directory")
        if slot.exists():
            found.append(_read_one(slot))
    return _combined(str(path), found)


def spool_status(db: sqlite3.Connection, path: str) -> SpoolStatus:
    """What the open spool database `db` holds (`path` names it in the answer)."""
    jobs, size, oldest = db.execute(
        "SELECT count(*), coalesce(sum(size), 0), min(enqueued_at) FROM jobs"
    ).fetchone()
    per = db.execute("SELECT destination, count(*) FROM jobs GROUP BY destination")
    destinations = {str(name): int(count) for name, count in per}
    [refused] = db.execute("SELECT count(*) FROM refused").fetchone()
    blocked = {str(d): str(r) for d, r in db.execute("SELECT destination, reason FROM blocked")}
    age = None if oldest is None else max(time.time() - oldest, 0.0)
    return SpoolStatus(path, int(jobs), int(size), age, destinations, int(refused), blocked, [path])


def _read_one(slot: Path) -> SpoolStatus:
    key = inode(slot)
    if key not in owned_here:
        with slot.open("rb") as file:
            header = file.read(100)
        check_header(slot, header)
        if not header:  # created, not yet written: holds nothing
            return SpoolStatus(str(slot), 0, 0, None, {}, 0, {}, [str(slot)])
    db = sqlite3.connect(f"{slot.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return spool_status(db, str(slot))
    except sqlite3.OperationalError as error:
        if "no such table" not in str(error):
            raise
        return SpoolStatus(str(slot), 0, 0, None, {}, 0, {}, [str(slot)])  # being created
    finally:
        db.close()


def _combined(path: str, parts: list[SpoolStatus]) -> SpoolStatus:
    destinations: dict[str, int] = {}
    blocked: dict[str, str] = {}
    for part in parts:
        for name, count in part.destinations.items():
            destinations[name] = destinations.get(name, 0) + count
        blocked.update(part.blocked)
    ages = [part.oldest_age_s for part in parts if part.oldest_age_s is not None]
    return SpoolStatus(
        path,
        sum(part.jobs for part in parts),
        sum(part.bytes for part in parts),
        max(ages) if ages else None,
        destinations,
        sum(part.refused for part in parts),
        blocked,
        [slot for part in parts for slot in part.slots],
    )
