"""The `Idempotency-Key` binding's state machine on the Redis status store, as every ingress
replica sees it (`consumer/stores/_keys.py`; the memory store runs the same rules in
`tests/unit/test_ingress_keys.py`)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from consumer.stores import KeyState, StatusStore, open_status_store
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.integration


@pytest.fixture
async def store() -> AsyncIterator[StatusStore]:
    opened = await open_status_store("redis", REDIS_URL, f"t{uuid.uuid4().hex[:8]}", 60)
    assert opened is not None
    yield opened
    await opened.close()


async def test_replicas_reserving_one_key_at_once_hold_it_once(store: StatusStore) -> None:
    reservations = await asyncio.gather(
        *(store.reserve_key("k", f"job-{i}", "fp", 30) for i in range(20))
    )
    held = [r for r in reservations if r.held]
    assert len(held) == 1
    assert {r.binding.job_id for r in reservations} == {held[0].binding.job_id}


async def test_failed_then_taken_over_then_published(store: StatusStore) -> None:
    first = await store.reserve_key("k", "job-1", "fp", 30)
    assert not (await store.reserve_key("k", "job-2", "fp", 30)).held
    await store.settle_key("k", first.binding.holder, KeyState.FAILED)
    assert not (await store.reserve_key("k", "job-2", "other", 30)).held
    retry = await store.reserve_key("k", "job-2", "fp", 30)
    assert retry.held and retry.binding.job_id == "job-1"
    await store.settle_key("k", first.binding.holder, KeyState.FAILED)  # not the holder
    await store.settle_key("k", retry.binding.holder, KeyState.PUBLISHED, spooled=True)
    repeat = await store.reserve_key("k", "job-3", "fp", 30)
    assert not repeat.held
    assert (repeat.binding.state, repeat.binding.job_id, repeat.binding.spooled) == (
        KeyState.PUBLISHED,
        "job-1",
        True,
    )


async def test_an_expired_lease_counts_as_failed(store: StatusStore) -> None:
    await store.reserve_key("k", "job-1", "fp", 0.05)
    await asyncio.sleep(0.1)
    retry = await store.reserve_key("k", "job-2", "fp", 30)
    assert retry.held and retry.binding.job_id == "job-1"


async def test_bindings_expire_with_the_retention() -> None:
    store = await open_status_store("redis", REDIS_URL, f"t{uuid.uuid4().hex[:8]}", 0.2)
    assert store is not None
    try:
        first = await store.reserve_key("k", "job-1", "fp", 30)
        await store.settle_key("k", first.binding.holder, KeyState.PUBLISHED)
        await asyncio.sleep(0.4)
        fresh = await store.reserve_key("k", "job-2", "fp", 30)
    finally:
        await store.close()
    assert fresh.held and fresh.binding.job_id == "job-2"
