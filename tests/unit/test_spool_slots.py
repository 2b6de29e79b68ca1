"""A spool path is a set of slot files, one per process: the first free one is owned, a
slot left by a process that is gone is drained by another, a forked child never uses its
parent's spool, the lock is on the database file itself, and a file that is not a spool
is refused and left as it was."""

from __future__ import annotations

import asyncio
import os
import select
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer import (
    JobProducer,
    NotASpool,
    SpoolSettings,
    SyncJobProducer,
    read_spool_status,
)
from producer._spool import SpoolFile
from producer.memory import MemoryBroker
from producer.retrying import set_testing
from schemas import encode
from tests.unit.test_spool import TOPIC, DownAtStart, Spooled, published, settings


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    set_testing(True)
    yield
    set_testing(False)


def left_behind(slot: Path, count: int) -> list[str]:
    """A slot file with `count` jobs whose process is gone; their ids."""
    spool = SpoolFile.open(slot, SpoolSettings(path=slot, max_processes=1))
    messages = [encode(Spooled(key="k", n=n), source="/tests", key="k") for n in range(count)]
    spool.append([(TOPIC, message) for message in messages])
    spool.close()
    return [message.attributes.id for message in messages]


def flock_from_another_process(path: Path) -> str:
    code = (
        "import fcntl, sys\n"
        "fd = open(sys.argv[1], 'rb')\n"
        "try:\n"
        "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except BlockingIOError:\n"
        "    print('held')\n"
        "else:\n"
        "    print('free')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


async def test_a_slot_left_with_jobs_is_taken_drained_and_let_go(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.create_topic(TOPIC, 1)
    path = tmp_path / "spool.db"
    orphan = tmp_path / "spool.db.3"  # a process that was scaled down left it
    ids = left_behind(orphan, 7)
    producer = JobProducer(settings(path, retry_max_s=0.05), publisher=DownAtStart(broker))
    async with producer:
        assert await broker.wait_until(lambda: len(published(broker)) == 7, max_wait_s=5)
        async with asyncio.timeout(5):
            while read_spool_status(path).jobs:  # noqa: ASYNC110 - a poll of a file
                await asyncio.sleep(0.01)
        spooling = producer._spooling
        assert spooling is not None
        assert spooling.spool.path == path  # its own slot is the first free one
        async with asyncio.timeout(5):  # the drained slot is let go (at the end of a round)
            while (  # noqa: ASYNC110 - a poll of a lock
                again := SpoolFile.take(orphan, SpoolSettings(path=orphan), create=False)
            ) is None:
                await asyncio.sleep(0.01)
        again.close()
    assert [job_id for *_, job_id in published(broker)] == ids
    assert sorted(read_spool_status(path).slots) == [str(path), str(orphan)]


async def test_a_restarted_process_takes_the_lowest_free_slot_with_its_jobs(
    tmp_path: Path,
) -> None:
    broker = MemoryBroker()
    broker.create_topic(TOPIC, 1)
    path = tmp_path / "spool.db"
    ids = left_behind(path, 3)
    async with JobProducer(settings(path), publisher=DownAtStart(broker)) as producer:
        assert producer._spooling is not None
        assert producer._spooling.spool.path == path
        assert await broker.wait_until(lambda: len(published(broker)) == 3, max_wait_s=5)
    assert [job_id for *_, job_id in published(broker)] == ids


def test_the_lock_is_on_the_database_file_itself(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = SpoolFile.open(path, SpoolSettings(path=path))
    try:
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".lock")) == []
        assert flock_from_another_process(path) == "held"
        # SQLite's own (POSIX) locks are independent of the flock: it reads and writes.
        spool.append([(TOPIC, encode(Spooled(key="k", n=0), source="/tests"))])
        assert read_spool_status(path).jobs == 1
    finally:
        spool.close()
    assert flock_from_another_process(path) == "free"


def test_a_forked_child_opens_a_slot_of_its_own_and_drops_the_parents_lock(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spool.db"
    settings = SpoolSettings(path=path)
    parent = SpoolFile.open(path, settings)
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, wait for the parent, report again, exit
        try:
            child = SpoolFile.open(path, settings)
            try:
                parent.append([(TOPIC, encode(Spooled(key="k", n=0), source="/tests"))])
                used = "used the parent's spool"
            except RuntimeError:
                used = "refused"
            os.write(to_parent_w, f"{child.path.name} {used}\n".encode())
            os.read(to_child_r, 1)
            child.close()
        finally:
            os._exit(0)
    try:
        ready, _, _ = select.select([to_parent_r], [], [], 10)
        assert ready, "the child did not answer"
        answer = os.read(to_parent_r, 1000).decode().split()
        assert answer == ["spool.db.1", "refused"]
        parent.append([(TOPIC, encode(Spooled(key="k", n=1), source="/tests"))])
        parent.close()
        # The child lives on; the parent's slot is free all the same.
        assert flock_from_another_process(path) == "free"
        assert read_spool_status(path).jobs == 1
    finally:
        os.write(to_child_w, b"x")
        os.waitpid(pid, 0)


@pytest.fixture
def foreign_files(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.txt"
    text.write_text("not a spool\n")
    other = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE customers (id INTEGER)")
    db.commit()
    db.close()
    folder = tmp_path / "folder"
    folder.mkdir()
    return {"text": text, "sqlite": other, "directory": folder}


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("kind", ["text", "sqlite", "directory"])
async def test_a_producer_refuses_a_file_that_is_not_a_spool_and_leaves_it(
    tmp_path: Path, foreign_files: dict[str, Path], kind: str
) -> None:
    before = snapshot(tmp_path)
    producer = JobProducer(settings(foreign_files[kind]), publisher=DownAtStart(MemoryBroker()))
    with pytest.raises(NotASpool, match="is not a jobstream spool") as caught:
        await producer.start()
    assert "\n" not in str(caught.value)
    assert snapshot(tmp_path) == before  # unchanged, and nothing added (no lock file)
    with pytest.raises(NotASpool):
        read_spool_status(foreign_files[kind])
    assert snapshot(tmp_path) == before


def test_a_sync_producer_forked_after_first_use_spools_to_a_slot_of_its_own(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spool.db"
    broker = MemoryBroker()
    producer = SyncJobProducer(settings(path), publisher=DownAtStart(broker))
    with producer:
        assert producer.spool_status().path == str(path)
        to_parent_r, to_parent_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # a gunicorn worker: its own loop, producer and slot
            try:
                os.write(to_parent_w, producer.spool_status().path.encode())
                producer.stop()
            finally:
                os._exit(0)
        ready, _, _ = select.select([to_parent_r], [], [], 20)
        assert ready, "the child did not answer"
        assert os.read(to_parent_r, 1000).decode() == f"{path}.1"
        os.waitpid(pid, 0)
        assert producer.spool_status().path == str(path)  # the parent's is untouched
