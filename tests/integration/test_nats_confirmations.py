"""Confirmed acks sent as batches (issue 16): a batch's verbs go as plain publishes with
replies to one inbox, and only the verbs left without a reply are sent again. Proven on a
nats-server of the test's own, stopped (SIGSTOP) while the acks are under way for longer
than a round waits: the round's replies come too late, the verbs are sent again, every ack
lands once the server answers, each message is forgotten once, and nothing is redelivered.

(A SIGKILL instead loses the consumer's unflushed state with the server: whether its acks
are then answered depends on what the server had written, so it is not a stable test.)"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from consumer.nats._confirmations import ACK, Confirmations
from consumer.nats._held import Held, Puller
from tests.own_services import OwnServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 300


@pytest.fixture
def server(tmp_path: Path) -> Iterator[OwnServer]:
    own = OwnServer(tmp_path / "nats-store")
    yield own
    own.stop(signal.SIGKILL)


@pytest.mark.timeout(120)
async def test_acks_lost_with_a_killed_server_are_sent_again_and_land_once(
    server: OwnServer,
) -> None:
    await server.start()
    client = await nats.connect(
        server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, connect_timeout=2
    )
    try:
        js = client.jetstream(timeout=5)
        await js.add_stream(
            StreamConfig(name="ACKS", subjects=["acks.>"], storage=StorageType.FILE)
        )
        for seq in range(N):
            await js.publish("acks.job", str(seq).encode())
        config = ConsumerConfig(
            durable_name="workers", ack_policy=AckPolicy.EXPLICIT, ack_wait=60, max_ack_pending=N
        )
        pull = await js.pull_subscribe("acks.job", durable="workers", config=config)
        messages = []
        while len(messages) < N:
            messages += await pull.fetch(N - len(messages), timeout=5)
        forgotten: Counter[int] = Counter()
        confirmations = Confirmations(5.0, lambda held: forgotten.update([held.seq]))
        await confirmations.start(client)
        puller = Puller("workers", partitioned=False)
        deadline = time.monotonic() + 50  # well inside the ack wait
        now = datetime.now(UTC)
        held = [Held(msg, puller, i, 1, now, deadline) for i, msg in enumerate(messages)]

        server.pause()  # the acks are written to a server that does not read them
        for one in held:
            confirmations.queue(one, ACK)
        await asyncio.sleep(3.5)  # longer than a round waits for its replies (2 s)
        server.resume()
        async with asyncio.timeout(40):
            await confirmations.settled()

        assert confirmations.resent >= N, "the first round got no reply in time: sent again"
        assert forgotten == Counter(range(N)), "each message forgotten exactly once"
        info = await js.consumer_info("ACKS", "workers")
        assert info.num_ack_pending == 0
        assert info.num_redelivered == 0
        assert await js.consumer_info("ACKS", "workers") is not None
        await confirmations.stop()
    finally:
        await client.close()
