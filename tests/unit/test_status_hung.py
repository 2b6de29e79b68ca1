"""A status store that stops answering never holds a job (issue 16 moved the bound from a
timer per write to one per batch of writes): against a server that accepts and never
replies, each batch of writes ends with `TimeoutError` after `WRITE_TIMEOUT_S`, and the
status step lets every job of the batch run and complete."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from consumer.core import Delivery, JobRun, Outcome
from consumer.steps import StatusStep
from consumer.stores import JobState
from consumer.stores._status_redis import WRITE_TIMEOUT_S, RedisStatusStore
from schemas import Job, encode


class Noted(Job, type="test.noted", version=1, register=False):
    seq: int


@pytest.fixture
async def silent_server() -> AsyncIterator[str]:
    """A TCP server that reads everything and answers nothing (a hung Redis)."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"redis://127.0.0.1:{port}/0"
    server.close()


async def test_a_hung_status_store_fails_each_batch_and_every_job_completes(
    silent_server: str,
) -> None:
    client = redis.Redis.from_url(silent_server, decode_responses=True, socket_timeout=60)
    store = RedisStatusStore(client, f"t{uuid.uuid4().hex[:6]}", 600)
    step = StatusStep(store)
    ran: list[str] = []

    async def handler(run: JobRun) -> Outcome:
        assert run.attributes is not None
        ran.append(run.attributes.id)
        return Outcome.COMPLETED

    runs = []
    for seq in range(50):
        message = encode(Noted(seq=seq), source="/t", key=f"k{seq}")
        runs.append(
            JobRun(Delivery("p", seq, "t", message.attributes, message.body), None, None, None)
        )
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(4 * WRITE_TIMEOUT_S + 5):  # two writes per job, batched
        outcomes = await asyncio.gather(*(step(run, handler) for run in runs))
    assert outcomes == [Outcome.COMPLETED] * 50
    assert sorted(ran) == sorted(
        m.attributes.id for m in (r.delivery for r in runs) if m.attributes
    )
    assert loop.time() - started >= 2 * WRITE_TIMEOUT_S  # each write waited out its bound
    with pytest.raises(TimeoutError):
        await store.record("x", JobState.RUNNING)
    await client.aclose()
