"""The idempotency step claims, renews (late, for long jobs), completes and releases."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from consumer import ClaimState, MemoryIdempotencyStore
from consumer.core import Delivery, IdempotencySettings, JobRun, Outcome
from consumer.steps import IdempotencyStep
from schemas import JobAttributes


def run_for(job_id: str) -> JobRun:
    attributes = JobAttributes(id=job_id, type="t.x", source="/t", time=datetime.now(UTC))
    delivery = Delivery(partition=0, offset=0, topic="t", attributes=attributes, body=b"{}")
    return JobRun(delivery, None, None, None)


async def test_a_long_job_keeps_its_claim_past_the_lease() -> None:
    store = MemoryIdempotencyStore()
    step = IdempotencyStep(store, IdempotencySettings(lease_s=0.3), owner="w1")
    seen: list[ClaimState] = []

    async def long_job(_: JobRun) -> Outcome:
        await asyncio.sleep(0.5)  # past the 0.3 s lease: only a renewal keeps the claim
        seen.append(await store.claim("job-1", "w2", 0.3))
        await asyncio.sleep(0.2)
        return Outcome.COMPLETED

    assert await step(run_for("job-1"), long_job) is Outcome.COMPLETED
    assert seen == [ClaimState.BUSY]
    assert await store.claim("job-1", "w2", 0.3) is ClaimState.COMPLETED


async def test_a_redelivered_completed_job_is_a_duplicate_and_a_retry_is_released() -> None:
    store = MemoryIdempotencyStore()
    step = IdempotencyStep(store, IdempotencySettings(lease_s=30), owner="w1")

    async def done(_: JobRun) -> Outcome:
        return Outcome.COMPLETED

    async def retrying(_: JobRun) -> Outcome:
        return Outcome.RETRYING

    assert await step(run_for("a"), done) is Outcome.COMPLETED
    assert await step(run_for("a"), done) is Outcome.DUPLICATE
    assert await step(run_for("b"), retrying) is Outcome.RETRYING
    assert await store.claim("b", "w2", 30) is ClaimState.CLAIMED, "released for the retry"
