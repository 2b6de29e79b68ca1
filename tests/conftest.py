"""Shared fixtures: broker addresses, and a fresh topic / stream per test.

Integration tests need the services `make up` starts. They never skip: an unreachable
broker fails the test with a message that says to run `make up`.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

KAFKA_BOOTSTRAP = os.environ.get("JOBSTREAM_TEST_KAFKA", "127.0.0.1:9092")
NATS_URL = os.environ.get("JOBSTREAM_TEST_NATS", "nats://127.0.0.1:4222")
REDIS_URL = os.environ.get("JOBSTREAM_TEST_REDIS", "redis://127.0.0.1:6379/0")
POSTGRES_DSN = os.environ.get(
    "JOBSTREAM_TEST_POSTGRES", "postgresql://jobstream@127.0.0.1:5432/postgres"
)


def unique_name(request: pytest.FixtureRequest, prefix: str = "t") -> str:
    """A name no other test (or earlier run) uses: the test's name plus a random suffix."""
    base = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name).strip("-")[:60]
    return f"{prefix}-{base}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def kafka_bootstrap() -> str:
    return KAFKA_BOOTSTRAP


@pytest.fixture
def nats_url() -> str:
    return NATS_URL


@pytest.fixture
async def kafka_admin() -> AsyncIterator[AIOKafkaAdminClient]:
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA_BOOTSTRAP, request_timeout_ms=10_000)
    try:
        await admin.start()
    except Exception as error:
        await admin.close()
        pytest.fail(f"Kafka is not reachable at {KAFKA_BOOTSTRAP} ({error!r}): run `make up`")
    yield admin
    await admin.close()


NewTopicFactory = Callable[..., Awaitable[str]]


@pytest.fixture
async def new_topic(
    request: pytest.FixtureRequest, kafka_admin: AIOKafkaAdminClient
) -> AsyncIterator[NewTopicFactory]:
    """Create topics private to this test; they are deleted afterwards."""
    created: list[str] = []

    async def create(partitions: int = 1, name: str | None = None) -> str:
        topic = name or unique_name(request)
        await kafka_admin.create_topics(
            [NewTopic(name=topic, num_partitions=partitions, replication_factor=1)]
        )
        created.append(topic)
        return topic

    yield create
    if created:
        await kafka_admin.delete_topics(created)


@pytest.fixture
async def group_id(request: pytest.FixtureRequest) -> str:
    return unique_name(request, "g")


@pytest.fixture
async def nats_client() -> AsyncIterator[nats.NATS]:
    try:
        client = await nats.connect(NATS_URL, connect_timeout=3, max_reconnect_attempts=0)
    except Exception as error:
        pytest.fail(f"NATS is not reachable at {NATS_URL} ({error!r}): run `make up`")
    yield client
    await client.drain()


@pytest.fixture
def jetstream(nats_client: nats.NATS) -> JetStreamContext:
    return nats_client.jetstream()


NewStreamFactory = Callable[..., Awaitable[tuple[str, str]]]


@pytest.fixture
async def new_stream(
    request: pytest.FixtureRequest, jetstream: JetStreamContext
) -> AsyncIterator[NewStreamFactory]:
    """Create JetStream streams private to this test: returns (stream, subject prefix)."""
    created: list[str] = []

    async def create(**config: object) -> tuple[str, str]:
        name = unique_name(request, "S").replace("-", "_")
        prefix = name.lower()
        await jetstream.add_stream(StreamConfig(name=name, subjects=[f"{prefix}.>"], **config))  # type: ignore[arg-type]
        created.append(name)
        return name, prefix

    yield create
    for name in created:
        await jetstream.delete_stream(name)
