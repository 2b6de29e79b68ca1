"""The ingress writes `pending` after its publish returns; a fast worker may have written
`running` (or a final state) first. `pending` never replaces a later state, on the memory
store and (same merge) on Redis; it only adds what the record lacks. This race made the
demo's cancellation miss its job (`test_demo[nats]`), since the demo cancels a running job."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from consumer.stores import JobState, MemoryStatusStore


@pytest.mark.parametrize("later", [JobState.RUNNING, JobState.SUCCEEDED, JobState.RETRYING])
async def test_pending_written_late_keeps_the_workers_state(later: JobState) -> None:
    store = MemoryStatusStore()
    await store.record("job-1", later, attempts=1)
    created = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
    status = await store.record(
        "job-1", JobState.PENDING, job_type="report.generate", created_at=created
    )
    assert (status.state, status.attempts) == (later, 1)
    assert (status.job_type, status.created_at) == ("report.generate", created)
    assert await store.get("job-1") == status


async def test_pending_first_then_running_moves_on() -> None:
    store = MemoryStatusStore()
    await store.record("job-2", JobState.PENDING, job_type="report.generate")
    status = await store.record("job-2", JobState.RUNNING, attempts=1)
    assert (status.state, status.job_type) == (JobState.RUNNING, "report.generate")
