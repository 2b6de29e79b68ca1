"""Reaching the broker at start-up: retried with backoff for `worker.broker_wait_s`."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from consumer.core import Settings, WorkerError
from producer import BrokerUnavailable
from producer.retrying import Backoff, retry

log = logging.getLogger("jobstream.worker")
T = TypeVar("T")
_BROKER_BACKOFF = Backoff(initial_s=0.5, max_s=10.0, jitter=True)


async def until_reachable(settings: Settings, connect: Callable[[], Awaitable[T]]) -> T:
    """`connect()`, retried with backoff while the broker is unreachable (`connect` raises
    `BrokerUnavailable`), for up to `worker.broker_wait_s`; then `WorkerError` (the worker
    exits 1 with that one line). Every connection a worker opens at start waits as long."""
    budget = settings.worker.broker_wait_s
    try:
        return await retry(
            connect,
            on=BrokerUnavailable,
            backoff=_BROKER_BACKOFF,
            deadline=time.monotonic() + budget,
            on_retry=_unreachable,
        )
    except BrokerUnavailable as error:
        msg = f"{error} (gave up after {budget:g}s: worker.broker_wait_s)"
        raise WorkerError(msg) from error


def _unreachable(error: Exception, wait_s: float) -> None:
    log.warning("%s; retrying in %.1fs", error, wait_s)
