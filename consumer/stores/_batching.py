"""One request to a store for the claims (or completions) made in one turn of the loop.

The worker starts the jobs of a fetch in one turn of the event loop, and each job's first
store call is its claim; jobs that end together record their completions together. Sent
one by one, each call is a round trip and, with redis-py, a pooled connection of its own
(256 concurrent claims opened 256 connections): 163 µs of CPU per job for a claim and a
completion on Redis, against 33 µs sent as one pipeline per turn (issue 16, measured on
the 2-core development machine). `MicroBatch` gathers the calls of one turn and sends them
as one request; each caller still gets its own answer or its own error, so the callers'
retries and fencing are unchanged (`steps/_idempotency.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

A = TypeVar("A")
R = TypeVar("R")

log = logging.getLogger("jobstream.idempotency")

MAX_BATCH = 256
"""At most this many calls per request; a fuller turn sends several."""

Send = Callable[[Sequence[A]], Awaitable[Sequence[R | Exception]]]
"""Sends a batch: one answer per item, in order; an `Exception` in place of an answer is
that item's own error. Raising fails every item of the batch."""


class MicroBatch(Generic[A, R]):
    """Calls made in the same turn of the event loop, sent as one batch (see the module
    docstring). A caller cancelled while it waits does not cancel its batch: what was
    sent happens, as it would for a single call cancelled after it was written."""

    def __init__(
        self, send: Send[A, R], max_batch: int = MAX_BATCH, timeout_s: float | None = None
    ) -> None:
        """`timeout_s`: the most one batch may take; then each of its callers gets
        `TimeoutError` (one timer per batch, not one per call)."""
        self._send = send
        self._max = max_batch
        self._timeout_s = timeout_s
        self._pending: list[tuple[A, asyncio.Future[R]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def __call__(self, item: A) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        pending = self._pending
        pending.append((item, future))
        if len(pending) >= self._max:
            self._flush()
        elif len(pending) == 1:
            loop.call_soon(self._flush)  # after every call of this turn
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            sending = asyncio.create_task(self._send_batch(batch))
            self._sending.add(sending)
            sending.add_done_callback(self._sending.discard)

    async def _send_batch(self, batch: list[tuple[A, asyncio.Future[R]]]) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                answers = await self._send([item for item, _ in batch])
            if len(answers) != len(batch):
                msg = f"a batch of {len(batch)} got {len(answers)} answers"
                raise RuntimeError(msg)
        except Exception as error:  # noqa: BLE001 - each caller gets it, and retries
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        for (_, future), answer in zip(batch, answers, strict=True):
            if future.done():
                continue  # its caller was cancelled
            if isinstance(answer, Exception):
                future.set_exception(answer)
            else:
                future.set_result(answer)

    async def close(self, timeout_s: float = 1.0) -> None:
        """Send what is pending; wait for the batches in flight, `timeout_s` at most, then
        cancel them (their callers get `CancelledError`)."""
        self._flush()
        if not self._sending:
            return
        _, late = await asyncio.wait(set(self._sending), timeout=timeout_s)
        for task in late:
            task.cancel()
        if late:
            log.warning("%d store batches still in flight at close: cancelled", len(late))
            await asyncio.wait(late, timeout=timeout_s)
