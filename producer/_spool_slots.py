"""The slot files one sender holds: its own (the first free one of the spool path), and the
sibling slots it adopted because no process owns them and they hold jobs.

Rules (docs/producer.md, "The spool"):

- `open` owns the first free slot file (`SpoolLocked` if other processes own all
  `spool.max_processes` of them, `NotASpool` if one is not a spool).
- `adopt` takes the sibling slot files that no process owns and that hold jobs (a process
  that stopped or was scaled down left them); a slot that cannot be taken is logged and
  skipped, one that holds nothing is let go at once. `let_go_of_empty` releases adopted
  slots once drained.
- `take_every_free` (`jobstream spool flush`, without a slot of its own) takes every slot
  file that no process owns and names those that others own.
- Every SQLite call of these slots runs on one thread (one executor, shut down by `close`).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TypeVar

from producer._errors import NotASpool
from producer._settings import SpoolSettings
from producer._spool import Spool, SpoolFile
from producer._spool_file import slot_paths

__all__ = ["SpoolSlots"]

log = logging.getLogger("jobstream.producer")

T = TypeVar("T")


class SpoolSlots:
    """The slots of one `SpoolingSender`, as `Spool`s sharing one thread."""

    def __init__(self, settings: SpoolSettings) -> None:
        """`settings.path` must be set. Nothing is opened before `open`."""
        assert settings.path is not None
        self._settings = settings
        self._path = settings.path
        self._executor: ThreadPoolExecutor | None = None
        self._own: Spool | None = None
        self._adopted: list[Spool] = []

    @property
    def own(self) -> Spool:
        """This sender's own slot."""
        if self._own is None:
            msg = "the spool is not open: start the producer first"
            raise RuntimeError(msg)
        return self._own

    @property
    def is_open(self) -> bool:
        return self._own is not None

    def all(self) -> list[Spool]:
        """Its own slot (if open), then the adopted ones."""
        own = [self._own] if self._own is not None else []
        return [*own, *self._adopted]

    def jobs(self) -> int:
        """Jobs waiting in every slot held."""
        return sum(spool.jobs for spool in self.all())

    async def open(self) -> Spool:
        """Own the first free slot file of the spool path."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobstream-spool")
        self._executor = executor
        try:
            file = await self._run(lambda: SpoolFile.open(self._path, self._settings))
        except BaseException:
            self._executor = None
            executor.shutdown(wait=False)
            raise
        self._own = Spool(file, executor)
        return self._own

    async def adopt(self) -> None:
        """Take the sibling slot files no process owns that hold jobs."""
        held = {spool.path for spool in self.all()}
        for slot in slot_paths(self._path, self._settings.max_processes):
            if slot in held or not slot.exists():
                continue
            try:
                file = await self._run(partial(SpoolFile.take, slot, self._settings, create=False))
            except (OSError, sqlite3.Error, NotASpool) as error:
                log.warning("spool: cannot take the slot %s: %s", slot, error)
                continue
            if file is None:
                continue
            assert self._executor is not None
            adopted = Spool(file, self._executor)
            if not file.jobs:
                await adopted.close()
                continue
            log.info(
                "spool: %d jobs in %s, which no process owns: publishing them", file.jobs, slot
            )
            self._adopted.append(adopted)

    async def let_go_of_empty(self) -> None:
        """Release the adopted slots that hold nothing any more."""
        for spool in [s for s in self._adopted if not s.jobs]:
            self._adopted.remove(spool)
            await spool.close()

    async def take_every_free(self) -> list[Path]:
        """Without a slot of its own: take every slot file of the spool path that no
        process owns; returns those other processes own. `NotASpool` if one is not a
        spool. `close` afterwards, whatever happens."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobstream-spool")
        busy: list[Path] = []
        for slot in slot_paths(self._path, self._settings.max_processes):
            if not slot.exists() and not slot.is_symlink():
                continue
            file = await self._run(partial(SpoolFile.take, slot, self._settings, create=False))
            if file is None:
                busy.append(slot)
            else:
                self._adopted.append(Spool(file, self._executor))
        return busy

    async def close(self) -> None:
        """Close every slot held (releasing its lock) and the thread. Idempotent."""
        spools = self.all()
        self._own, self._adopted = None, []
        for spool in spools:
            await spool.close()
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)

    async def _run(self, function: Callable[[], T]) -> T:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)
