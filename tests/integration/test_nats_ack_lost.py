"""A publish whose connection drops before its PubAck came fails at once, as ambiguous
(`PublishTimeout`), instead of waiting out `nats.publish_timeout_s`: nats-py never fails
such a wait itself. On a cluster this wait was most of what a killed stream leader or a
rolling restart cost the producer (15 s, docs/operations.md)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from producer import NatsSettings, PublishTimeout, RoutingSettings
from producer.nats import NatsPublisher
from tests.own_services import OwnServer

pytestmark = pytest.mark.integration


@pytest.fixture
async def own_server(tmp_path: Path) -> AsyncIterator[OwnServer]:
    server = OwnServer(tmp_path / "nats-store")
    await server.start()
    try:
        yield server
    finally:
        server.stop(signal.SIGKILL)


@pytest.mark.timeout(60)
async def test_a_publish_whose_connection_drops_is_ambiguous_at_once(own_server: OwnServer) -> None:
    client = await nats.connect(own_server.url)
    try:
        await client.jetstream().add_stream(name="ACKLOST", subjects=["acklost.>"])
    finally:
        await client.close()
    settings = NatsSettings(
        servers=[own_server.url], publish_timeout_s=20, max_reconnect_attempts=0
    )
    publisher = NatsPublisher(settings, RoutingSettings(stream="ACKLOST"))
    await publisher.start()
    try:
        stored = await publisher.send_raw("acklost.a", {"Nats-Msg-Id": "j1"}, b"{}")
        assert (stored.job_id, stored.duplicate) == ("j1", False)
        own_server.pause()  # the publish goes out; no PubAck can come
        await _stopped(own_server)
        publishing = asyncio.create_task(
            publisher.send_raw("acklost.a", {"Nats-Msg-Id": "j2"}, b"{}")
        )
        await asyncio.sleep(0.5)
        assert not publishing.done()
        began = time.monotonic()
        own_server.stop(signal.SIGKILL)  # the connection drops
        with pytest.raises(PublishTimeout) as raised:
            await publishing
        waited = time.monotonic() - began
    finally:
        await publisher.stop()
    assert waited < 5, f"waited {waited:.1f}s for an acknowledgement that could not come"
    assert raised.value.transport == "nats" and raised.value.destination == "acklost.a"


async def _stopped(server: OwnServer) -> None:
    """Wait until the kernel shows the server stopped (SIGSTOP is delivered asynchronously:
    a publish sent at once could still be answered)."""
    assert server.process is not None
    deadline = time.monotonic() + 5
    while _state(server.process.pid) != "T":
        assert time.monotonic() < deadline, "the server did not stop within 5 s"
        await asyncio.sleep(0.01)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
