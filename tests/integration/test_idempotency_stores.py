"""Every idempotency store keeps the same contract, against the real servers.

A claim belongs to one delivery (a token), never to a worker, and the store does not judge
leases: a claim whose lease ran out stays BUSY until a waiting delivery takes it over by
compare-and-set on the stamp it saw (issue 13, K4)."""

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
    # Not judged by the store: the claim is still w1's until a waiter takes it over.
    assert await store.claim(key, "w2", 30) is ClaimState.BUSY
    seen = await store.holder(key)
    assert seen is not None
    assert await store.take_over(key, seen, "w2", 30)
    assert not await store.renew(key, "w1", 30)
    assert await store.renew(key, "w2", 30)


async def test_a_claim_belongs_to_one_token_not_to_a_worker(store: IdempotencyStore) -> None:
    """Two deliveries of one job to the same worker have two tokens: the second is BUSY."""
    key = uuid.uuid4().hex
    assert await store.claim(key, "worker-a:1", 30) is ClaimState.CLAIMED
    assert await store.claim(key, "worker-a:2", 30) is ClaimState.BUSY
    assert await store.claim(key, "worker-a:1", 30) is ClaimState.CLAIMED  # a retried claim
    await store.release(key, "worker-a:2")  # not the holder: no effect
    assert await store.claim(key, "worker-a:2", 30) is ClaimState.BUSY
    assert not await store.renew(key, "worker-a:2", 30)


async def test_a_renewal_changes_the_stamp_so_a_stale_take_over_fails(
    store: IdempotencyStore,
) -> None:
    key = uuid.uuid4().hex
    assert await store.holder(key) is None
    assert await store.claim(key, "w1", 30) is ClaimState.CLAIMED
    first = await store.holder(key)
    assert first is not None
    assert await store.holder(key) == first, "unchanged while nobody writes"
    assert await store.renew(key, "w1", 30)
    second = await store.holder(key)
    assert second not in (None, first)
    assert not await store.take_over(key, first, "w2", 30), "the holder renewed meanwhile"
    assert await store.renew(key, "w1", 30)
    await store.complete(key, "w1", 60)
    assert await store.holder(key) is None
    assert not await store.take_over(key, second, "w2", 30)
    assert await store.claim(key, "w2", 30) is ClaimState.COMPLETED


async def test_a_late_completion_is_recorded_and_fences_the_taker(store: IdempotencyStore) -> None:
    """A holder cut off by an outage records its completion after a takeover: the job is
    completed, and the delivery that took the claim over loses it at its next renewal."""
    key = uuid.uuid4().hex
    assert await store.claim(key, "w1", 30) is ClaimState.CLAIMED
    seen = await store.holder(key)
    assert seen is not None
    assert await store.take_over(key, seen, "w2", 30)
    await store.complete(key, "w1", 60)
    assert not await store.renew(key, "w2", 30)
    assert await store.claim(key, "w3", 30) is ClaimState.COMPLETED


async def test_concurrent_take_overs_have_one_winner(store: IdempotencyStore) -> None:
    key = uuid.uuid4().hex
    assert await store.claim(key, "w0", 30) is ClaimState.CLAIMED
    seen = await store.holder(key)
    assert seen is not None
    won = await asyncio.gather(*(store.take_over(key, seen, f"w{i}", 30) for i in range(1, 11)))
    assert won.count(True) == 1
    winner = f"w{won.index(True) + 1}"
    assert await store.renew(key, winner, 30)
    assert not await store.renew(key, "w0", 30)


async def test_concurrent_claims_have_one_winner(store: IdempotencyStore) -> None:
    key = uuid.uuid4().hex
    results = await asyncio.gather(*(store.claim(key, f"w{i}", 30) for i in range(20)))
    assert results.count(ClaimState.CLAIMED) == 1
    assert results.count(ClaimState.BUSY) == 19


async def test_claims_and_completions_of_one_turn_each_get_their_own_answer(
    store: IdempotencyStore,
) -> None:
    """What a fetch does: many claims in one turn of the loop (sent as one batch where the
    store batches, more than one batch here), two deliveries per key among them."""
    keys = [uuid.uuid4().hex for _ in range(300)]
    done = set(keys[:100])
    await asyncio.gather(*(store.claim(key, "old", 30) for key in done))
    await asyncio.gather(*(store.complete(key, "old", 60) for key in done))
    claims = [(key, f"{key}:{n}") for key in keys for n in (1, 2)]
    answers = await asyncio.gather(*(store.claim(key, token, 30) for key, token in claims))
    by_key: dict[str, list[ClaimState]] = {}
    for (key, _), answer in zip(claims, answers, strict=True):
        by_key.setdefault(key, []).append(answer)
    assert all(by_key[key] == [ClaimState.COMPLETED] * 2 for key in done)
    running = [key for key in keys if key not in done]
    assert all(by_key[key] == [ClaimState.CLAIMED, ClaimState.BUSY] for key in running)
    await asyncio.gather(*(store.complete(key, f"{key}:1", 60) for key in running))
    again = await asyncio.gather(*(store.claim(key, "late", 30) for key in keys))
    assert again == [ClaimState.COMPLETED] * len(keys)
