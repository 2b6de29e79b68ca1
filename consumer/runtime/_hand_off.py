"""Handing a failed job on, bounded: every backend's retry records and dead letters go
through here (`consumer.runtime._record_routing`, `consumer.nats`).

Guarantees:

- A publish error is transient or permanent: `PublishError.retriable` (broker unavailable,
  busy, no acknowledgement in time) is transient, anything else permanent
  (`producer._errors` draws the tree).
- A transient error is retried with backoff for at most `retry.hand_off_timeout_s`; the
  job stays unsettled meanwhile. Past it `WorkerError` is raised: the worker stops, exits
  non-zero, and the job's record is delivered again after the restart (nothing lost).
- A permanent error is raised as it is, at once: the caller changes course (a refused
  retry record dead-letters the job).
- A dead letter is offered whole, then reduced (`consumer.core._reduction`) each time the
  broker refuses the form before for good. When even the smallest form is refused, or
  the job's hand-off is otherwise impossible, `WorkerError` is raised (the job is not
  settled; the worker stops rather than hold the partition forever).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from consumer.core import DEAD_LETTER_FORMS, WorkerError, error_text, reduced_dead_letter
from producer import PublishError, Receipt
from producer.retrying import Backoff, retry

__all__ = ["store_dead_letter", "until_acknowledged"]

log = logging.getLogger("jobstream.routing")
_HAND_OFF_BACKOFF = Backoff(initial_s=0.2, max_s=10.0, jitter=True)
_WHY_BYTES = 300

Headers = list[tuple[str, bytes]]


def transient(error: Exception) -> bool:
    """A publish error worth retrying: the broker may take the record later."""
    return isinstance(error, PublishError) and error.retriable


async def until_acknowledged(
    publish: Callable[[], Awaitable[Receipt]], timeout_s: float, what: str = "a failed job"
) -> Receipt:
    """Publish until the broker acknowledges, retrying transient errors with backoff for
    up to `timeout_s` (`retry.hand_off_timeout_s`); a permanent error is raised at once."""
    try:
        return await retry(
            publish,
            on=transient,
            backoff=_HAND_OFF_BACKOFF,
            deadline=time.monotonic() + timeout_s,
            on_retry=_not_handed_on,
        )
    except PublishError as error:
        if not error.retriable:
            raise
        msg = (
            f"could not hand {what} on for {timeout_s:g}s (retry.hand_off_timeout_s): {error}; "
            "the worker stops so that it is restarted; the job was not settled and will be "
            "delivered again"
        )
        raise WorkerError(msg) from error


async def store_dead_letter(
    publish: Callable[[Headers, bytes], Awaitable[Receipt]],
    headers: Headers,
    body: bytes,
    original: Sequence[tuple[str, bytes | None]],
    *,
    prefix: str,
    timeout_s: float,
    what: str,
) -> tuple[Receipt, str]:
    """Store a dead letter whole, else reduced; (receipt, the form that was stored)."""
    refused: PublishError | None = None
    for form in DEAD_LETTER_FORMS:
        why = "" if refused is None else f"{refused.reason}: {error_text(refused, _WHY_BYTES)}"
        offered, value = reduced_dead_letter(form, headers, body, original, why=why, prefix=prefix)
        try:
            receipt = await until_acknowledged(
                functools.partial(publish, offered, value), timeout_s, what
            )
        except PublishError as error:  # permanent: offer a smaller form
            log.error("the broker refused the dead letter of %s (%s): %s", what, form, error)
            refused = error
            continue
        return receipt, form
    msg = (
        f"the dead letter of {what} could not be stored, not even reduced: {refused}; the "
        "job was not settled; the worker stops so that it is redelivered after a restart "
        "(check the dead-letter destination)"
    )
    raise WorkerError(msg) from refused


def _not_handed_on(error: Exception, wait_s: float) -> None:
    log.error("could not hand a failed job on (%s); retrying in %.1fs", error, wait_s)
