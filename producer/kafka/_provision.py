"""Creating Kafka topics: the missing ones, with the configured partitions and replicas
(chosen from the cluster's size unless set) and `min.insync.replicas`, waiting until each
partition has a leader. An existing topic is left as it is."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

from producer._errors import PublishError
from producer._settings import RoutingSettings
from producer.retrying import Backoff, retry

_LEADER_WAIT_S = 30.0
_LEADER_BACKOFF = Backoff(initial_s=0.05, max_s=1.0)


async def kafka_replication(
    admin: AIOKafkaAdminClient, routing: RoutingSettings
) -> tuple[int, dict[str, str]]:
    """(replication factor, topic configs) for a new topic: `routing.replicas_for` the
    number of brokers the cluster's metadata lists, and its `min.insync.replicas`."""
    brokers = len((await admin.describe_cluster())["brokers"])
    replicas, min_insync = routing.replicas_for(brokers)
    return replicas, {"min.insync.replicas": str(min_insync)}


async def ensure_kafka_topics(
    admin: AIOKafkaAdminClient, topics: Sequence[str], routing: RoutingSettings
) -> list[str]:
    """Create the missing `topics`; returns the ones created now."""
    existing = set(await admin.list_topics())
    missing = [t for t in dict.fromkeys(topics) if t not in existing]
    if not missing:
        return []
    replicas, configs = await kafka_replication(admin, routing)
    response = await admin.create_topics(
        [NewTopic(t, routing.partitions, replicas, topic_configs=configs) for t in missing]
    )
    created: list[str] = []
    for entry in response.topic_errors:
        topic, code = entry[0], entry[1]
        if code == 0:
            created.append(topic)
        elif code != TopicAlreadyExistsError.errno:  # created concurrently: fine
            error = for_code(code)
            detail = entry[2] if len(entry) > 2 and entry[2] else error.description
            msg = f"kafka refused to create topic {topic!r}: {error.message} ({detail})"
            raise PublishError(f"{msg}; check the broker's permissions and limits")
    await _wait_for_leaders(admin, created)
    return created


async def _wait_for_leaders(admin: AIOKafkaAdminClient, topics: list[str]) -> None:
    """Return once every partition of `topics` has a leader (a new topic takes a moment),
    so the first publish does not bounce off NOT_LEADER_FOR_PARTITION."""
    waiting = list(topics)

    async def leaderless() -> list[str]:
        described = await admin.describe_topics(waiting)
        waiting[:] = [
            t["topic"]
            for t in described
            if t["error_code"] != 0
            or not t["partitions"]
            or any(p["leader"] < 0 for p in t["partitions"])
        ]
        return waiting

    if waiting:
        async with asyncio.timeout(_LEADER_WAIT_S):
            await retry(leaderless, until=lambda left: not left, backoff=_LEADER_BACKOFF)
