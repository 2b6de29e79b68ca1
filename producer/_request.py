"""`PublishRequest`: one job and its publish options, and when it is due."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime, timedelta

from producer._settings import Priority
from schemas import Job, JobMessage, encode

__all__ = ["PublishRequest", "due"]


@dataclasses.dataclass(frozen=True, slots=True)
class PublishRequest:
    """One job for `publish_many`, with the options `publish` takes as keywords."""

    job: Job
    """The job payload."""
    key: str | None = None
    """Ordering key: jobs with the same key are processed one at a time, in order."""
    id: str | None = None
    """Job id (default: a random UUID). Reuse it to publish the same job again safely."""
    idempotency_key: str | None = None
    """Deduplication key for the workers (default: the job id)."""
    not_before: datetime | None = None
    """Do not start the job before this (timezone-aware) time."""
    subject: str | None = None
    """CloudEvents `subject`: what the job is about, e.g. `user/42`."""
    delay: float | timedelta | None = None
    """Shorthand for `not_before = now + delay` (seconds, or a `timedelta`); not with
    `not_before`. docs/scheduling.md says how long a job may wait and how precisely."""
    priority: Priority = "normal"
    """`high`, `normal` or `low`: the level's own topic or subject (`routing.priorities`)."""
    unique_key: str | None = None
    """While a job published with this key is inside its `unique_for` window, a publish
    with the same key returns that job's receipt instead of publishing (`unique.url`)."""
    unique_for: float | timedelta | None = None
    """The unique window (seconds, or a `timedelta`), from the first publish; needs
    `unique_key`."""


def due(request: PublishRequest) -> datetime | None:
    """The request's `not_before`, from `delay` when given. `ValueError` for both, or for a
    delay that is negative or not finite."""
    if request.delay is None:
        return request.not_before
    if request.not_before is not None:
        msg = "pass not_before or delay, not both"
        raise ValueError(msg)
    delay = request.delay
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
    if not math.isfinite(seconds) or seconds < 0:
        msg = f"delay must be a finite number of seconds >= 0, got {delay!r}"
        raise ValueError(msg)
    return datetime.now(UTC) + timedelta(seconds=seconds)


def encode_request(
    request: PublishRequest,
    source: str,
    trace: tuple[str | None, str | None],
    origin: tuple[str | None, str | None],
) -> JobMessage:
    """`request` as the message to publish (or to keep in the outbox): its options as
    CloudEvents attributes, `trace` as its (`traceparent`, `tracestate`), `origin` as
    the trace of the request that created it (`tracecontext.TraceHeaders`)."""
    return encode(
        request.job,
        source=source,
        id=request.id,
        key=request.key,
        idempotency_key=request.idempotency_key,
        not_before=due(request),
        subject=request.subject,
        traceparent=trace[0],
        tracestate=trace[1],
        origin_traceparent=origin[0],
        origin_tracestate=origin[1],
    )
