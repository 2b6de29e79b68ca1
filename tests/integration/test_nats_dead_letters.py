"""Issue 13, K2, on real NATS JetStream: a dead letter counts as stored only if JetStream
stored it. A PubAck that says `duplicate` (the message id was seen in the dead-letter
stream's duplicate window) stored nothing new; after the job stream is re-created its
sequences start again at 1, and the dead letter of a new job must not be dropped as a
repeat of the old one's.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import nats
import pytest
from nats.js import JetStreamContext

from consumer import Settings
from consumer.core import DeadLetterFilter, DeadLetterRecord
from consumer.nats import ensure_dead_letter_stream, list_nats_dead_letters, stream_destinations
from producer.nats import ensure_nats_stream
from tests.apps.hostile import HostileJob, app
from tests.conftest import NATS_URL
from tests.support import publish_nats, running_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
async def js() -> AsyncIterator[JetStreamContext]:
    client = await nats.connect(NATS_URL)
    yield client.jetstream()
    await client.close()


async def provision(js: JetStreamContext, settings: Settings, subject: str) -> None:
    await ensure_nats_stream(js, stream_destinations(settings, [subject]), settings.routing)
    await ensure_dead_letter_stream(js, settings, [subject])


async def dead_letters(settings: Settings) -> list[DeadLetterRecord]:
    return await list_nats_dead_letters(settings, [], DeadLetterFilter())


async def until_dead_letters(settings: Settings, count: int) -> list[DeadLetterRecord]:
    found: list[DeadLetterRecord] = []
    for _ in range(100):
        found = await dead_letters(settings)
        if len(found) >= count:
            break
        await asyncio.sleep(0.1)
    return found


async def test_a_dead_letter_is_not_dropped_as_a_duplicate_after_the_stream_is_recreated(
    js: JetStreamContext,
) -> None:
    stream = f"H_{uuid.uuid4().hex[:8]}".upper()
    prefix = stream.lower()
    subject = f"{prefix}.test.hostile"
    settings = Settings(
        transport="nats",
        nats={"servers": [NATS_URL]},
        routing={"stream": stream, "subject_prefix": f"{prefix}."},
        worker={"group": "dlq-dup"},
        retry={"policy": {"max_attempts": 1}},
    )
    await provision(js, settings, subject)
    try:
        [first] = await publish_nats(subject, [(None, HostileJob(behaviour="fail"))])
        async with running_worker(app, settings) as worker:
            assert [x.job_id for x in await until_dead_letters(settings, 1)] == [first]
            assert not worker.stopped_by_fault
        # The job stream is re-created (its sequences start again at 1); the dead-letter
        # stream and its duplicate window stay.
        await js.delete_stream(stream)
        await provision(js, settings, subject)
        [second] = await publish_nats(subject, [(None, HostileJob(behaviour="fail"))])
        async with running_worker(app, settings) as worker:
            letters = await until_dead_letters(settings, 2)
            info = await js.consumer_info(stream, "dlq-dup")
            assert not worker.stopped_by_fault
        assert sorted(x.job_id or "" for x in letters) == sorted([first, second])
        assert {x.reason for x in letters} == {"retries-exhausted"}
        assert info.num_ack_pending == 0, "the original was terminated after the dead letter"
        ids = [x.header("Nats-Msg-Id") for x in letters]
        assert len(set(ids)) == 2 and all(i and i.startswith(f"dlq:{stream}:1:") for i in ids)
    finally:
        for name in (stream, f"{stream}_DLQ"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(name)
