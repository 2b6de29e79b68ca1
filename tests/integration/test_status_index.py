"""The status store's dashboard queries on real Redis: pages of jobs from the index,
recent changes, workers' reports, and ids whose status expired skipped."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from consumer.stores import (
    JobQuery,
    JobState,
    PartitionBacklog,
    StatusStore,
    WorkerReport,
    open_status_store,
)
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.integration


@pytest.fixture
async def store() -> AsyncIterator[StatusStore]:
    opened = await open_status_store("redis", REDIS_URL, f"t{uuid.uuid4().hex[:8]}", 60)
    assert opened is not None
    yield opened
    await opened.close()


async def test_pages_filter_and_continue_newest_first(store: StatusStore) -> None:
    for index in range(12):
        state = JobState.DEAD_LETTERED if index % 4 == 0 else JobState.SUCCEEDED
        await store.record(f"j{index:02}", state, job_type="t", key=f"k{index % 3}")
    page = await store.list_jobs(JobQuery(state=JobState.SUCCEEDED, limit=5))
    assert [job.job_id for job in page.jobs] == ["j11", "j10", "j09", "j07", "j06"]
    rest = await store.list_jobs(
        JobQuery(state=JobState.SUCCEEDED, limit=5, cursor=page.next_cursor or 0)
    )
    assert [job.job_id for job in rest.jobs] == ["j05", "j03", "j02", "j01"]
    assert rest.next_cursor is None and rest.scanned == 12 - page.scanned
    keyed = await store.list_jobs(JobQuery(key="k0", state=JobState.DEAD_LETTERED))
    assert [job.job_id for job in keyed.jobs] == ["j00"]  # k0: 0, 3, 6, 9; dead: 0, 4, 8
    # A change moves a job to the front.
    await store.record("j00", JobState.DEAD_LETTERED, reason="retries-exhausted")
    assert (await store.list_jobs(JobQuery(limit=1))).jobs[0].job_id == "j00"
    since = datetime.now(UTC)
    await store.record("j05", JobState.SUCCEEDED)
    assert [job.job_id for job in await store.recent(since)] == ["j05"]
    assert len(await store.recent(since - timedelta(minutes=5))) == 12


async def test_expired_statuses_drop_out_and_reports_expire_on_their_own() -> None:
    short = await open_status_store("redis", REDIS_URL, f"t{uuid.uuid4().hex[:8]}", 0.3)
    assert short is not None
    try:
        await short.record("old", JobState.SUCCEEDED)
        await short.report_worker(
            WorkerReport(
                worker="w",
                group="g",
                transport="kafka",
                in_flight=1,
                reported_at=datetime.now(UTC),
                backlog=(PartitionBacklog(destination="t", partition="0", messages=3),),
            )
        )
        assert [report.worker for report in await short.workers()] == ["w"]
        for _ in range(50):  # the status expires after 0.3 s
            if await short.get("old") is None:
                break
            await asyncio.sleep(0.05)
        await short.record("new", JobState.SUCCEEDED)
        page = await short.list_jobs(JobQuery())
        assert [job.job_id for job in page.jobs] == ["new"]
        assert page.scanned == 1  # trimmed from the index by the retention, not only skipped
    finally:
        await short.close()
