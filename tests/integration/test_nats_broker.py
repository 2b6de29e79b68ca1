"""The local NATS server runs JetStream: durable pull consumers, acks, reconnects."""

from __future__ import annotations

import asyncio

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from tests.conftest import NATS_URL

pytestmark = pytest.mark.integration


async def test_acked_message_is_not_redelivered_after_reconnect(jetstream, new_stream) -> None:
    stream, prefix = await new_stream()
    config = ConsumerConfig(durable_name="workers", ack_policy=AckPolicy.EXPLICIT, ack_wait=2)
    await jetstream.add_consumer(stream, config)
    ack = await jetstream.publish(f"{prefix}.job", b"payload-1")
    assert (ack.stream, ack.seq) == (stream, 1)

    first = await nats.connect(NATS_URL)
    try:
        sub = await first.jetstream().pull_subscribe_bind("workers", stream=stream)
        [message] = await sub.fetch(1, timeout=5)
        assert message.data == b"payload-1"
        await message.ack_sync()
    finally:
        await first.close()

    # A new connection binds the same durable consumer; wait past the ack wait so that an
    # unacked message would have come back.
    await asyncio.sleep(2.5)
    second = await nats.connect(NATS_URL)
    try:
        sub = await second.jetstream().pull_subscribe_bind("workers", stream=stream)
        with pytest.raises(nats.errors.TimeoutError):
            await sub.fetch(1, timeout=1)
        info = await second.jetstream().consumer_info(stream, "workers")
        assert info.num_ack_pending == 0
        assert info.num_pending == 0
        assert info.delivered.stream_seq == 1
    finally:
        await second.close()
