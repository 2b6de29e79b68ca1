"""Step: record the job's state transitions in the status store (running, then its
outcome), and each attempt in the job's history (start, end, this worker, the error and its
traceback). Writes are bounded in time and never fail the job: status is an observation."""

from __future__ import annotations

import logging
from typing import Any

from consumer.core import JobRun, Next, Outcome, error_text, traceback_text, utc_now
from consumer.stores import Attempt, JobState, StatusStore, trace_id_now

log = logging.getLogger("jobstream.status")
_STATES = {
    Outcome.COMPLETED: JobState.SUCCEEDED,
    Outcome.RETRYING: JobState.RETRYING,
    Outcome.DEAD_LETTERED: JobState.DEAD_LETTERED,
    Outcome.FAILED: JobState.FAILED,
    Outcome.CANCELLED: JobState.CANCELLED,
}


class StatusStep:
    def __init__(self, store: StatusStore, worker: str = "") -> None:
        self._store = store
        self._worker = worker or None

    async def __call__(self, run: JobRun, call_next: Next) -> Outcome:
        attributes = run.attributes
        if attributes is None:
            return await call_next(run)
        job_id = attributes.id
        await self._write(
            job_id,
            JobState.RUNNING,
            job_type=attributes.type,
            attempts=attributes.attempt,
            trace_id=trace_id_now(),
            key=attributes.key,
            history_entry=Attempt(
                attempt=attributes.attempt, started_at=utc_now(), worker=self._worker
            ),
        )
        outcome = await call_next(run)
        state = _STATES.get(outcome)
        if state is not None:
            error = run.error
            attempts = run.context.attempt if run.context else attributes.attempt
            message = (
                f"{type(error).__name__}: {error_text(error, 480)}" if error is not None else None
            )
            await self._write(
                job_id,
                state,
                attempts=attempts,
                last_error=message,
                reason=run.failure_reason if outcome is Outcome.DEAD_LETTERED else None,
                history_entry=Attempt(
                    attempt=attributes.attempt,
                    ended_at=utc_now(),
                    outcome=state,
                    error=message,
                    traceback=traceback_text(error) if error is not None else None,
                ),
            )
        return outcome

    async def _write(self, job_id: str, state: JobState, **fields: Any) -> None:
        # Bounded by the store (`stores.WRITE_TIMEOUT_S`, one timer per batch of writes).
        try:
            await self._store.record(job_id, state, **fields)
        except Exception as error:  # noqa: BLE001 - status must never fail a job
            log.warning("could not record %s for job %s: %s", state.value, job_id, error)
