"""The Redis status store writes the transitions of one turn of the loop as one
transaction, and checks cancellations of one turn with one MGET (issue 16): each job still
gets its own merged status, in the order its transitions were recorded, and a final state
is never replaced by a late, stale one, whether they share a batch or not."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from consumer.stores import JobState, StatusStore, open_status_store
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.integration


@pytest.fixture
async def store() -> AsyncIterator[StatusStore]:
    opened = await open_status_store("redis", REDIS_URL, f"t{uuid.uuid4().hex[:8]}", 600)
    assert opened is not None
    yield opened
    await opened.close()


async def test_the_transitions_of_one_turn_each_land_in_order(store: StatusStore) -> None:
    jobs = [uuid.uuid4().hex for _ in range(400)]  # more than one batch
    finished, late = jobs[:200], jobs[200:300]
    await asyncio.gather(*(store.record(j, JobState.SUCCEEDED, attempts=1) for j in late))

    async def lifecycle(job_id: str) -> None:
        await store.record(job_id, JobState.RUNNING, job_type="t.job", attempts=1)
        if job_id in finished:
            await store.record(job_id, JobState.SUCCEEDED, attempts=1)

    # One batch holds running for one job and succeeded for another; the late ones get a
    # stale `running` (a redelivery) after their final state.
    await asyncio.gather(*(lifecycle(j) for j in jobs))
    states = {j: (await store.get(j)) for j in jobs}
    assert all(s is not None for s in states.values())
    assert [j for j in finished if states[j].state is not JobState.SUCCEEDED] == []  # type: ignore[union-attr]
    assert [j for j in late if states[j].state is not JobState.SUCCEEDED] == []  # type: ignore[union-attr]
    running = jobs[300:]
    assert [j for j in running if states[j].state is not JobState.RUNNING] == []  # type: ignore[union-attr]
    assert all(states[j].job_type == "t.job" for j in finished)  # type: ignore[union-attr]


async def test_two_transitions_of_one_job_in_one_batch_merge_in_order(store: StatusStore) -> None:
    job_id = uuid.uuid4().hex
    first, second = await asyncio.gather(
        store.record(job_id, JobState.RUNNING, job_type="t.job", attempts=2),
        store.record(job_id, JobState.FAILED, last_error="boom"),
    )
    assert first.state is JobState.RUNNING
    assert (second.state, second.job_type, second.attempts) == (JobState.FAILED, "t.job", 2)
    stored = await store.get(job_id)
    assert stored is not None
    assert (stored.state, stored.last_error) == (JobState.FAILED, "boom")


async def test_cancellation_checks_of_one_turn_each_get_their_own_answer(
    store: StatusStore,
) -> None:
    jobs = [uuid.uuid4().hex for _ in range(300)]
    asked = set(jobs[::3])
    for job_id in asked:
        await store.request_cancel(job_id)
    answers = await asyncio.gather(*(store.cancelled([j]) for j in jobs))
    assert [j for j, found in zip(jobs, answers, strict=True) if found] == jobs[::3]
    assert all(found in (set(), {j}) for j, found in zip(jobs, answers, strict=True))
    assert await store.cancelled(jobs) == asked
    assert await store.cancelled([]) == set()
