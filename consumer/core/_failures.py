"""What a failure means: retry (and after how long) or dead-letter, and the failure details
that travel with the job in `ce_job*` headers.

The details replace earlier ones on each attempt (never appended), so a record's headers
stay the same size however often it is retried; only `jobfirstfail` and the `jobsrc*`
origin are carried over from the first failure.
"""

from __future__ import annotations

import random
import re
import traceback
from datetime import UTC, datetime, timedelta

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
    "decide",
    "failure_details",
    "qualified_name",
    "unescape",
    "utc_now",
]

MAX_ERROR_CHARS = 1000
MAX_TRACEBACK_CHARS = 4000


def qualified_name(error: BaseException) -> str:
    cls = type(error)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


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
    if isinstance(error, Retry) and error.delay_s is not None:
        delay = error.delay_s
    else:
        delay = policy.delay_s(attempt, (rng or random).random())
    first = _first_failure(run) or now
    if (now + timedelta(seconds=delay) - first).total_seconds() > policy.budget_s:
        return Decision(retry=False, delay_s=0.0, reason="retry-budget-exhausted")
    reason = error.reason if isinstance(error, JobstreamError) else "error"
    return Decision(retry=True, delay_s=delay, reason=reason)


def failure_details(
    run: JobRun, error: BaseException, decision: Decision, group: str, now: datetime
) -> dict[str, str]:
    """The `job*` extension attributes describing this failure (replacing earlier ones)."""
    delivery = run.delivery
    previous = run.attributes.extensions if run.attributes is not None else {}
    trace = "".join(traceback.format_exception(error))
    details = {
        REASON: decision.reason,
        ERROR_TYPE: qualified_name(error),
        ERROR: _printable(str(error))[:MAX_ERROR_CHARS] or "-",
        TRACEBACK: _printable(trace)[-MAX_TRACEBACK_CHARS:],
        SOURCE_TOPIC: previous.get(SOURCE_TOPIC, delivery.topic),
        SOURCE_PARTITION: previous.get(
            SOURCE_PARTITION, str(_partition_number(delivery.partition))
        ),
        SOURCE_OFFSET: previous.get(SOURCE_OFFSET, str(delivery.offset)),
        GROUP: group,
        FIRST_FAILURE: previous.get(FIRST_FAILURE, _timestamp(now)),
        LAST_FAILURE: _timestamp(now),
    }
    return details


def utc_now() -> datetime:
    return datetime.now(UTC)


def _first_failure(run: JobRun) -> datetime | None:
    if run.attributes is None:
        return None
    value = run.attributes.extensions.get(FIRST_FAILURE)
    try:
        return datetime.fromisoformat(value) if value else None
    except ValueError:
        return None


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _partition_number(partition: object) -> str:
    # Kafka: a TopicPartition (its `partition` field); other sources use plain values, and a
    # plain str has a `partition` *method*, which must not be mistaken for the field.
    number = getattr(partition, "partition", partition)
    return str(partition if callable(number) else number)


def _printable(text: str) -> str:
    # Header values carry no control characters (NATS headers cannot hold line breaks):
    # newlines travel escaped as a backslash and `n`; `unescape` restores them for display.
    text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", " ")
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def unescape(value: str) -> str:
    """A failure header value as it was written (line breaks restored)."""
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)
