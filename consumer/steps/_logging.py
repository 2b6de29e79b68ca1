"""Step: one structured log line per job outcome (job id, type, attempt, duration)."""

from __future__ import annotations

import asyncio
import logging
import time

from consumer.core import JobRun, Next, Outcome, error_text

log = logging.getLogger("jobstream.job")


async def logging_step(run: JobRun, call_next: Next) -> Outcome:
    try:
        outcome = await call_next(run)
    except asyncio.CancelledError:
        _emit(run, "abandoned", logging.WARNING)
        raise
    level = logging.INFO if run.error is None else logging.WARNING
    _emit(run, outcome.value, level)
    return outcome


def _emit(run: JobRun, outcome: str, level: int) -> None:
    attributes = run.attributes
    fields: dict[str, object] = {
        "outcome": outcome,
        "duration_ms": round((time.monotonic() - run.started) * 1000, 3),
        "topic": run.delivery.topic,
        "offset": run.delivery.offset,
    }
    if attributes is not None:
        fields |= {
            "job_id": attributes.id,
            "job_type": attributes.type,
            "attempt": attributes.attempt,
        }
    if run.error is not None:
        fields |= {"error_type": type(run.error).__name__, "error": error_text(run.error, 500)}
    log.log(level, "job %s", outcome, extra={"job": fields})
