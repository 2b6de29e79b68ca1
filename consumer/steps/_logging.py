"""Step: one structured log line per job outcome (job id, type, attempt, duration).

Nothing is built when the `jobstream.job` logger is not enabled for the line's level:
`Logger.isEnabledFor` is a dict lookup that `logging` itself caches and clears whenever a
level changes, so a level set at run time takes effect at the next job.
"""

from __future__ import annotations

import asyncio
import logging
import time

from consumer.core import JobRun, Next, Outcome, error_text

log = logging.getLogger("jobstream.job")
_INFO, _WARNING = logging.INFO, logging.WARNING
# Where the record says it was logged from (the line is always this step's), without the
# stack walk `Logger.log` does for every line.
_WHERE = (__file__, 0, "logging_step")


async def logging_step(run: JobRun, call_next: Next) -> Outcome:
    try:
        outcome = await call_next(run)
    except asyncio.CancelledError:
        if log.isEnabledFor(_WARNING):
            _emit(run, "abandoned", _WARNING)
        raise
    level = _INFO if run.error is None else _WARNING
    if log.isEnabledFor(level):
        _emit(run, outcome.value, level)
    return outcome


def _emit(run: JobRun, outcome: str, level: int) -> None:
    delivery = run.delivery
    attributes = delivery.attributes
    duration_ms = round((time.monotonic() - run.started) * 1000, 3)
    fields: dict[str, object]
    if attributes is not None:
        fields = {
            "outcome": outcome,
            "duration_ms": duration_ms,
            "topic": delivery.topic,
            "offset": delivery.offset,
            "job_id": attributes.id,
            "job_type": attributes.type,
            "attempt": attributes.attempt,
        }
    else:
        fields = {
            "outcome": outcome,
            "duration_ms": duration_ms,
            "topic": delivery.topic,
            "offset": delivery.offset,
        }
    error = run.error
    if error is not None:
        fields["error_type"] = type(error).__name__
        fields["error"] = error_text(error, 500)
    path, line, function = _WHERE
    record = log.makeRecord(
        log.name, level, path, line, f"job {outcome}", (), None, function, {"job": fields}
    )
    log.handle(record)
