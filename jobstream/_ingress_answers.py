"""The ingress's answers: JSON errors, the 202 of an accepted job, and what each publish
failure tells the client.

| failure | answer |
|---|---|
| `InvalidAttributes` (a `?key=` over the header limit) | 400: which attribute, the limit |
| `RecordTooLarge` | 413: the broker's size limit |
| `DestinationMissing` | 500: the topic or stream to provision |
| `BrokerUnavailable`, `BrokerBusy`, `SpoolFull` (any other retriable error) | 503 + Retry-After |
| `PublishTimeout` | 503 + Retry-After + `job_id`, `outcome: unknown` (1) |
| any other `PublishError` | 500: its message |

(1) The job may be stored: a retry with the same `Idempotency-Key` publishes the same job
id, which the workers run once.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from consumer.stores import JobState, JobStatus
from producer import (
    DestinationMissing,
    PublishError,
    PublishTimeout,
    RecordTooLarge,
)
from schemas import InvalidAttributes

__all__ = ["accepted", "error", "publish_failure"]


def error(
    status: int, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """`{"error": message, **extra}` with `status`."""
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def accepted(
    job_id: str,
    recorded: JobStatus | None,
    *,
    spooled: bool,
    trace_id: str | None = None,
    state: JobState = JobState.PENDING,
    duplicate: bool = False,
) -> JSONResponse:
    """202 `{job_id, status_url, state, trace_id, spooled}` with `Location: status_url`;
    `state` when nothing was recorded (the status store did not answer). `duplicate`: the
    job is a unique key's earlier one (`"duplicate": true` is added)."""
    body = {
        "job_id": job_id,
        "status_url": f"/v1/jobs/{job_id}",
        "state": recorded.state.value if recorded else state.value,
        "trace_id": recorded.trace_id if recorded and recorded.trace_id else trace_id,
        "spooled": spooled,
    }
    if duplicate:
        body["duplicate"] = True
    return JSONResponse(body, 202, headers={"Location": f"/v1/jobs/{job_id}"})


def publish_failure(
    failure: PublishError | InvalidAttributes, job_id: str, *, keyed: bool, retry_after_s: int
) -> JSONResponse:
    """The answer to a publish of `job_id` that raised `failure` (see the module table).
    `keyed`: the request carried an `Idempotency-Key` (then a retry is safe)."""
    retry_after = {"Retry-After": str(retry_after_s)}
    if isinstance(failure, InvalidAttributes):
        return error(400, f"the job's attributes cannot be published: {failure}")
    if isinstance(failure, RecordTooLarge):
        return error(413, str(failure))
    if isinstance(failure, DestinationMissing):
        return error(500, str(failure))
    if isinstance(failure, PublishTimeout):
        retry = (
            "a retry with the same Idempotency-Key is safe: it publishes the same job id, "
            "and workers run a job id once"
            if keyed
            else "follow it at status_url; send an Idempotency-Key to make retries safe"
        )
        return error(
            503,
            f"the broker did not acknowledge the job in time; it may or may not be stored: {retry}",
            retry_after,
            job_id=job_id,
            status_url=f"/v1/jobs/{job_id}",
            outcome="unknown",
        )
    if failure.retriable:  # unreachable, busy, the spool full: nothing stored, it may pass
        return error(503, f"cannot publish now: {failure}", retry_after)
    return error(500, str(failure))
