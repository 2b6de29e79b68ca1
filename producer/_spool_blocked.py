"""The destinations the broker refuses for now, while it is reachable (a missing topic or
stream: `DestinationMissing`, `jobstream topics ensure`).

Rules (docs/producer.md, "The spool"):

- A blocked destination is retried with its own backoff (`Backoff.wait` of its failures in
  a row; no wait in testing), so the other destinations keep draining.
- It is noted in the spool file (`blocked`, for `spool status`) and logged as an error once
  per reason; `unblock` forgets both when it takes jobs again (or none wait).
"""

from __future__ import annotations

import logging
import time

from producer._errors import PublishError
from producer._spool import Spool
from producer.retrying import Backoff, is_testing

__all__ = ["BlockedDestinations"]

log = logging.getLogger("jobstream.producer")


class BlockedDestinations:
    """When each blocked destination is due to be tried again."""

    def __init__(self, backoff: Backoff) -> None:
        self._backoff = backoff
        self._next_try: dict[str, float] = {}  # blocked destination: when to try it again
        self._failures: dict[str, int] = {}

    def due(self, destination: str) -> bool:
        """Whether `destination` may be tried now (it is not waiting out a block)."""
        return self._next_try.get(destination, 0.0) <= time.monotonic()

    def wait_s(self, waiting: list[str]) -> float | None:
        """Seconds until the first of the `waiting` destinations is due (None: none)."""
        if not waiting:
            return None
        due = min(self._next_try.get(d, 0.0) for d in waiting)
        return max(due - time.monotonic(), 0.0)

    async def block(self, spool: Spool, destination: str, error: PublishError) -> None:
        """The broker refused `destination` for now (`error`): wait before the next try."""
        failures = self._failures.get(destination, 0) + 1
        self._failures[destination] = failures
        wait_s = 0.0 if is_testing() else self._backoff.wait(failures)
        self._next_try[destination] = time.monotonic() + wait_s
        reason = str(error)
        if spool.blocked.get(destination) == reason:
            return
        await spool.block(destination, reason)
        log.error(
            "spool: %d spooled jobs for %s cannot be published: %s. They stay in the spool "
            "and are retried with backoff; new jobs for it raise this error until then; "
            "other destinations are not held up",
            spool.waiting.get(destination, 0),
            destination,
            error,
        )

    async def unblock(self, spool: Spool, destination: str) -> None:
        """`destination` takes jobs again, or none wait."""
        self._next_try.pop(destination, None)
        self._failures.pop(destination, None)
        if destination in spool.blocked:
            await spool.unblock(destination)
            log.info("spool: %s takes jobs again", destination)
