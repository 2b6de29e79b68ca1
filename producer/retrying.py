"""Retrying what fails while a broker or a store is briefly away: one backoff for all.

Every wait for a dependency that is down goes through `retry`: connecting at start-up,
handing a failed job on, an idempotency store outage, confirming a JetStream ack, another
worker's claim, the leaders of a new topic. `retry` awaits an operation again after each
error it is told to retry (`on`) and each result it is told to wait out (`until`), with
exponential backoff (`Backoff`), until it succeeds or its `deadline` comes.

Guarantees:

- Only the errors `on` names are retried. Any other error, and `CancelledError` (a
  shutdown), propagates at once, also from a wait.
- Out of time, the last error is raised as it is, so the caller can say what to do about
  it in its own message. A wait never ends past the `deadline`: `retry` gives up instead
  of starting such a wait or, with `last_try_at_deadline`, shortens it to end at the
  deadline for one last attempt there.
- Without a `deadline`, an error is retried until it stops: for hand-offs that must not be
  dropped (the job stays unsettled while it waits).
- `on_retry` sees each retried error and the wait that follows, before the wait: the
  caller's log line.

`set_testing(True)` turns every wait into a zero wait, for tests: a deadline is still
judged as if the waits had happened (without jitter), so a test sees the same attempts,
at once. Built on tenacity (docs/architecture.md, "How are transient errors retried?").
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar, cast

import tenacity

__all__ = ["Backoff", "Retried", "is_testing", "retry", "set_testing"]

T = TypeVar("T")

Retried = type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], bool]
"""The errors to retry: exception classes, or a predicate on the error."""

_MAX_DOUBLINGS = 60  # past every cap; 2.0 ** 1024 would overflow in a long outage
_testing = False


def set_testing(testing: bool) -> None:
    """Turn testing mode on or off: on, `retry` never waits (see the module docstring)."""
    global _testing  # noqa: PLW0603 - one switch for the process, as stamina's set_testing
    _testing = testing


def is_testing() -> bool:
    """Whether testing mode is on."""
    return _testing


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: the first wait is `initial_s`, each later one twice the one
    before, up to `max_s`."""

    initial_s: float
    """The first wait, in seconds."""
    max_s: float
    """The longest wait, in seconds (the doubling stops there)."""
    jitter: bool = False
    """Multiply each wait by a random factor in [0.5, 1.5), so that workers that lost a
    broker together do not all come back at the same moment; the result is capped at
    `max_s` (never a longer wait than the longest one configured)."""

    def nominal(self, retry: int) -> float:
        """The wait before retry number `retry` (from 1), without jitter."""
        if retry <= 1:
            return self.initial_s
        return min(self.initial_s * 2.0 ** min(retry - 1, _MAX_DOUBLINGS), self.max_s)

    def wait(self, retry: int) -> float:
        """The wait before retry number `retry` (from 1), with jitter if asked for, at most
        `max_s` (the cap comes after the jitter)."""
        nominal = self.nominal(retry)
        if not self.jitter:
            return nominal
        return min(nominal * (0.5 + random.random()), max(self.max_s, nominal))


async def retry(
    operation: Callable[[], Awaitable[T]],
    *,
    backoff: Backoff,
    on: Retried = (),
    until: Callable[[T], bool] | None = None,
    deadline: float | None = None,
    last_try_at_deadline: bool = False,
    on_retry: Callable[[Exception, float], object] | None = None,
) -> T:
    """Await `operation()` until it succeeds, and return its result.

    `on`: the errors to retry. `until`: a result it rejects is awaited again (a poll); a
    deadline ends only retried errors, so bound a poll with `asyncio.timeout`.
    `deadline`: `time.monotonic()` by which to give up; then the last error is raised.
    `last_try_at_deadline`: shorten the last wait to end at the deadline and try once more
    there (bound the operation by the time left), instead of giving up before it.
    `on_retry(error, wait_s)`: called before each wait that follows an error.

    The first attempt is a plain call: when it succeeds (the common case, e.g. an
    idempotency claim per job) nothing else runs, so `retry` costs no more than the
    operation. Only a failure starts the retry machinery, which takes the first attempt's
    outcome as its own first attempt (nothing is called twice).
    """
    replay: list[T | Exception] = []
    try:
        result = await operation()
    except Exception as error:
        if not _matches(on, error):
            raise
        replay.append(error)
    else:
        if until is None or until(result):
            return result
        replay.append(result)
    skipped = 0.0  # the waits testing mode did not wait

    def now() -> float:
        return time.monotonic() + skipped

    def retried(state: tenacity.RetryCallState) -> bool:
        outcome = _outcome(state)
        error = outcome.exception()
        if error is None:
            return until is not None and not until(outcome.result())
        return isinstance(error, Exception) and _matches(on, error)

    def wait(state: tenacity.RetryCallState) -> float:
        number = state.attempt_number
        pause = backoff.nominal(number) if _testing else backoff.wait(number)
        if deadline is not None and last_try_at_deadline:
            pause = max(min(pause, deadline - now()), 0.0)
        return pause

    def stop(state: tenacity.RetryCallState) -> bool:
        if deadline is None or not _outcome(state).failed:
            return False
        if last_try_at_deadline:
            return now() >= deadline
        return now() + state.upcoming_sleep > deadline

    def before_sleep(state: tenacity.RetryCallState) -> None:
        error = _outcome(state).exception()
        if on_retry is not None and isinstance(error, Exception):
            on_retry(error, state.upcoming_sleep)

    async def sleep(seconds: float) -> None:
        nonlocal skipped
        if _testing:
            skipped += seconds
            seconds = 0.0
        await asyncio.sleep(seconds)

    async def attempt() -> T:
        # The first attempt already ran: its outcome is replayed, then the operation is
        # called again. (tenacity awaits only coroutine functions, so this is one.)
        if replay:
            outcome = replay.pop()
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        return await operation()

    retrying = tenacity.AsyncRetrying(
        retry=retried,
        wait=wait,
        stop=stop,
        before_sleep=before_sleep,
        sleep=sleep,
        reraise=True,
    )
    return cast("T", await retrying(attempt))


def _outcome(state: tenacity.RetryCallState) -> tenacity.Future:
    assert state.outcome is not None  # every decision follows an attempt
    return state.outcome


def _matches(on: Retried, error: Exception) -> bool:
    if isinstance(on, type | tuple):
        return isinstance(error, on)
    return on(error)
