"""Every idempotency store keeps the same contract, against the real servers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import nats
import pytest

from consumer import ClaimState, IdempotencyStore, MemoryIdempotencyStore, Settings
from consumer._backends import open_idempotency_store
from tests.conftest import NATS_URL, POSTGRES_DSN, REDIS_URL

pytestmark = pytest.mark.integration


@pytest.fixture(params=["memory", "redis", "postgres", "nats-kv"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[IdempotencyStore]:
    if request.param == "memory":
        opened: IdempotencyStore = MemoryIdempotencyStore()
    else:
        url = {"redis": REDIS_URL, "postgres": POSTGRES_DSN, "nats-kv": NATS_URL}[request.param]
        namespace = f"t{uuid.uuid4().hex[:8]}"
        idempotency = {"backend": request.param, "url": url, "namespace": namespace}
        opened = await open_idempotency_store(Settings.model_validate({"idempotency": idempotency}))
    yield opened
    await opened.close()
    if request.param == "nats-kv":
        client = await nats.connect(NATS_URL)
        await client.jetstream().delete_key_value(f"{namespace}_idempotency")
        await client.close()


async def test_claim_complete_and_duplicate(store: IdempotencyStore) -> None:
    key = uuid.uuid4().hex
    assert await store.claim(key, "w1", 30) is ClaimState.CLAIMED
    assert await store.claim(key, "w2", 30) is ClaimState.BUSY
    assert await store.claim(key, "w1", 30) is ClaimState.CLAIMED  # own claim again
    await store.complete(key, "w1", 60)
    assert await store.claim(key, "w2", 30) is ClaimState.COMPLETED
    assert await store.claim(key, "w1", 30) is ClaimState.COMPLETED


async def test_release_lets_another_worker_claim(store: IdempotencyStore) -> None:
    key = uuid.uuid4().hex
    assert await store.claim(key, "w1", 30) is ClaimState.CLAIMED
    await store.release(key, "w2")  # not the holder: no effect
    assert await store.claim(key, "w2", 30) is ClaimState.BUSY
    await store.release(key, "w1")
    assert await store.claim(key, "w2", 30) is ClaimState.CLAIMED


async def test_expired_lease_is_taken_over_and_renew_extends(store: IdempotencyStore) -> None:
    key = uuid.uuid4().hex
    assert await store.claim(key, "w1", 0.3) is ClaimState.CLAIMED
    assert await store.renew(key, "w1", 0.3)
    assert not await store.renew(key, "w2", 0.3)
    await asyncio.sleep(0.5)  # let the 0.3 s lease run out
    assert await store.claim(key, "w2", 30) is ClaimState.CLAIMED
    assert not await store.renew(key, "w1", 30)


async def test_concurrent_claims_have_one_winner(store: IdempotencyStore) -> None:
    key = uuid.uuid4().hex
    results = await asyncio.gather(*(store.claim(key, f"w{i}", 30) for i in range(20)))
    assert results.count(ClaimState.CLAIMED) == 1
    assert results.count(ClaimState.BUSY) == 19
