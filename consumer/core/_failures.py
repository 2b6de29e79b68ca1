"""What a failure means: retry (and after how long) or dead-letter, and the failure details
that travel with the job in `ce_job*` headers.

The details replace earlier ones on each attempt (never appended), so a record's headers
stay the same size however often it is retried; only `jobfirstfail` and the `jobsrc*`
origin are carried over from the first failure.

Everything read here comes from outside the runtime and is untrusted: the record's
attributes (a `jobfirstfail` without a UTC offset, or garbage), the handler's exception
(a huge or unencodable message, a `__str__` that raises, a `Retry(delay_s=nan)`). Neither
`decide` nor `failure_details` raises on such input: a first-failure time that cannot be
read is treated as absent (and replaced), a delay that is not a number >= 0 is replaced by
the policy's (a negative one by 0), a delay past the budget dead-letters the job
(`retry-budget-exhausted`), and the texts are cut by UTF-8 BYTES (`MAX_ERROR_BYTES`,
`MAX_TRACEBACK_BYTES`, `MAX_CARRIED_BYTES`), so the details of a retry record stay far
below `schemas.MAX_HEADER_BYTES` whatever the exception said.
"""

from __future__ import annotations

import math
import random
import re
import traceback
from datetime import UTC, datetime

from consumer.core._errors import Retry
from consumer.core._pipeline import Decision, JobRun
from consumer.core._settings import RetrySettings
from schemas import JobstreamError
from schemas.names import (
    ERROR,
    ERROR_TYPE,
    FAILURE_EXTENSIONS,
    FIRST_FAILURE,
    GROUP,
    LAST_FAILURE,
    REASON,
    REPLAY_OF,
    SOURCE_OFFSET,
    SOURCE_PARTITION,
    SOURCE_TOPIC,
    TRACEBACK,
)

__all__ = [
    "ERROR",
    "FAILURE_EXTENSIONS",
    "FIRST_FAILURE",
    "REASON",
    "REPLAY_OF",
    "SOURCE_TOPIC",
    "cut_text",
    "decide",
    "error_text",
    "failure_details",
    "first_failure_stamp",
    "qualified_name",
    "traceback_text",
    "unescape",
    "utc_now",
]

MAX_ERROR_BYTES = 1000
"""`joberror`: the first this many UTF-8 bytes of the exception's message."""
MAX_TRACEBACK_BYTES = 4000
"""`jobtraceback`: the last this many UTF-8 bytes of the formatted traceback."""
MAX_CARRIED_BYTES = 256
"""`jobsrc*` and `jobfirstfail` carried over from the record: at most this many bytes."""


def qualified_name(error: BaseException) -> str:
    cls = type(error)
    module, name = str(cls.__module__), str(cls.__qualname__)
    return name if module == "builtins" else f"{module}.{name}"


def error_text(error: BaseException, limit_bytes: int = MAX_ERROR_BYTES) -> str:
    """The exception's message as one printable line of at most `limit_bytes` UTF-8 bytes;
    never raises (a `__str__` that raises gives a placeholder naming the type)."""
    try:
        text = str(error)
    except BaseException:  # noqa: BLE001 - untrusted: even a KeyboardInterrupt from __str__
        return f"<unprintable {type(error).__name__}: its __str__ raised>"
    if not isinstance(text, str):  # a C extension's __str__ can return anything
        return f"<unprintable {type(error).__name__}>"
    return cut_text(_printable(text[:limit_bytes]), limit_bytes)


def decide(
    run: JobRun,
    error: BaseException,
    settings: RetrySettings,
    *,
    now: datetime,
    rng: random.Random | None = None,
) -> Decision:
    """Retry or dead-letter `run` after `error`, by the policy of its job type."""
    attributes = run.attributes
    if isinstance(error, JobstreamError) and not error.retriable:
        return Decision(retry=False, delay_s=0.0, reason=error.reason)
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(error).__mro__}
    if names & set(settings.non_retriable):
        return Decision(retry=False, delay_s=0.0, reason="non-retriable")
    attempt = attributes.attempt if attributes is not None else 1
    policy = settings.policy_for(attributes.type if attributes is not None else None)
    if attempt >= policy.max_attempts:
        return Decision(retry=False, delay_s=0.0, reason="retries-exhausted")
    delay = _requested_delay(error)
    if delay is None:
        delay = policy.delay_s(attempt, (rng or random).random())
    first = _first_failure(run) or now
    # In seconds, not datetimes: a delay of 1e12 s must dead-letter, not overflow a date.
    if (now - first).total_seconds() + delay > policy.budget_s:
        return Decision(retry=False, delay_s=0.0, reason="retry-budget-exhausted")
    reason = error.reason if isinstance(error, JobstreamError) else "error"
    return Decision(retry=True, delay_s=delay, reason=reason)


def failure_details(
    run: JobRun, error: BaseException, decision: Decision, group: str, now: datetime
) -> dict[str, str]:
    """The `job*` extension attributes describing this failure (replacing earlier ones)."""
    delivery = run.delivery
    previous = run.attributes.extensions if run.attributes is not None else {}

    def carried(name: str, default: str) -> str:
        return cut_text(previous.get(name, default), MAX_CARRIED_BYTES)

    return {
        REASON: decision.reason,
        ERROR_TYPE: cut_text(qualified_name(error), MAX_CARRIED_BYTES),
        ERROR: error_text(error) or "-",
        TRACEBACK: _traceback(error),
        SOURCE_TOPIC: carried(SOURCE_TOPIC, delivery.topic),
        SOURCE_PARTITION: carried(SOURCE_PARTITION, _partition_number(delivery.partition)),
        SOURCE_OFFSET: carried(SOURCE_OFFSET, str(delivery.offset)),
        GROUP: group,
        FIRST_FAILURE: first_failure_stamp(run, now),
        LAST_FAILURE: _timestamp(now),
    }


def first_failure_stamp(run: JobRun, now: datetime) -> str:
    """`jobfirstfail` for a failure of `run` at `now`: the first failure the job carries,
    else `now` (this is its first failure). The retry budget counts from it."""
    return _timestamp(_first_failure(run) or now)


def utc_now() -> datetime:
    return datetime.now(UTC)


def _requested_delay(error: BaseException) -> float | None:
    """The delay a handler asked for with `Retry(delay_s=...)`: None (use the policy's)
    unless it is a real number that is not nan; a negative one is 0; inf stays inf (past
    every budget)."""
    if not isinstance(error, Retry):
        return None
    delay = error.delay_s
    if isinstance(delay, bool) or not isinstance(delay, int | float):
        return None
    try:
        seconds = float(delay)
    except OverflowError:  # an int past every float
        return math.inf if delay > 0 else 0.0
    return None if math.isnan(seconds) else max(seconds, 0.0)


def _first_failure(run: JobRun) -> datetime | None:
    """`jobfirstfail` of the record in UTC, or None when absent or unreadable (no UTC
    offset, garbage, out of range once in UTC): the budget then counts from this failure,
    and the header is rewritten."""
    if run.attributes is None:
        return None
    value = run.attributes.extensions.get(FIRST_FAILURE)
    try:
        moment = datetime.fromisoformat(value) if value else None
        if moment is None or moment.utcoffset() is None:
            return None
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def traceback_text(error: BaseException) -> str:
    """The last `MAX_TRACEBACK_BYTES` of the formatted traceback, line breaks kept (the
    status store's attempt history; never raises)."""
    return unescape(_traceback(error))


def _traceback(error: BaseException) -> str:
    try:
        trace = "".join(traceback.format_exception(error))
    except BaseException:  # noqa: BLE001 - e.g. `__notes__` that is not a list of strings
        return "-"
    tail = _printable(trace[-MAX_TRACEBACK_BYTES:])
    return tail.encode("utf-8", "replace")[-MAX_TRACEBACK_BYTES:].decode("utf-8", "ignore")


def cut_text(text: str, limit_bytes: int = MAX_ERROR_BYTES) -> str:
    """`text` cut to at most `limit_bytes` UTF-8 bytes, at a character boundary."""
    if len(text) * 4 <= limit_bytes:
        return text
    return text.encode("utf-8", "replace")[:limit_bytes].decode("utf-8", "ignore")


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _partition_number(partition: object) -> str:
    # Kafka: a TopicPartition (its `partition` field); other sources use plain values, and a
    # plain str has a `partition` *method*, which must not be mistaken for the field.
    number = getattr(partition, "partition", partition)
    return str(partition if callable(number) else number)[:MAX_CARRIED_BYTES]


def _printable(text: str) -> str:
    # Header values carry no control characters (NATS headers cannot hold line breaks):
    # newlines travel escaped as a backslash and `n`; `unescape` restores them for display.
    text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", " ")
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def unescape(value: str) -> str:
    """A failure header value as it was written (line breaks restored)."""
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)
