"""Which topics and streams jobstream needs, and creating them.

`jobstream topics ensure` and `create_missing=True` are the only callers: publishing never
creates anything by itself.

- Kafka: one topic per job type (`RoutingSettings.topic`), created with the configured
  partitions and replication factor. An existing topic is left as it is.
- NATS: one stream (`RoutingSettings.stream`) capturing `<subject_prefix>>` plus any
  routed subject outside that prefix. An existing stream gets the missing subjects and the
  configured limits; its storage type is never changed.

`plan_destinations` is the one place that lists destinations; pass `extra` hooks to add
more per job type (retry tiers, a dead-letter topic) without changing this module.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError

from producer._errors import PublishError
from producer._settings import ProducerSettings, RoutingSettings

__all__ = [
    "DestinationHook",
    "ensure_kafka_topics",
    "ensure_nats_stream",
    "plan_destinations",
    "stream_subjects",
]

log = logging.getLogger("jobstream.producer")

_LEADER_WAIT_S = 30.0

DestinationHook = Callable[[str, str], Iterable[str]]
"""(job type, its main topic or subject) -> more destinations to provision for it."""


def plan_destinations(
    settings: ProducerSettings, job_types: Iterable[str], extra: Sequence[DestinationHook] = ()
) -> list[str]:
    """Topics (Kafka, memory) or subjects (NATS) for `job_types`, without repeats."""
    route = settings.routing.subject if settings.transport == "nats" else settings.routing.topic
    planned: list[str] = []
    for job_type in job_types:
        main = route(job_type)
        planned.append(main)
        for hook in extra:
            planned.extend(hook(job_type, main))
    return list(dict.fromkeys(planned))


async def ensure_kafka_topics(
    admin: AIOKafkaAdminClient, topics: Sequence[str], routing: RoutingSettings
) -> list[str]:
    """Create the missing `topics`; returns the ones created now."""
    existing = set(await admin.list_topics())
    missing = [t for t in dict.fromkeys(topics) if t not in existing]
    if not missing:
        return []
    response = await admin.create_topics(
        [NewTopic(t, routing.partitions, routing.replication_factor) for t in missing]
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
    pause = 0.05
    async with asyncio.timeout(_LEADER_WAIT_S):
        while topics:
            described = await admin.describe_topics(topics)
            topics = [
                t["topic"]
                for t in described
                if t["error_code"] != 0
                or not t["partitions"]
                or any(p["leader"] < 0 for p in t["partitions"])
            ]
            if topics:
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)


def stream_subjects(prefix: str, subjects: Iterable[str]) -> list[str]:
    """The subjects a stream must capture: `<prefix>>` (when the prefix ends with a dot)
    and every subject it does not cover."""
    wildcard = [f"{prefix}>"] if prefix.endswith(".") else []
    rest = [s for s in dict.fromkeys(subjects) if not any(_covers(w, s) for w in wildcard)]
    return wildcard + rest


async def ensure_nats_stream(
    js: JetStreamContext, subjects: Sequence[str], routing: RoutingSettings
) -> list[str]:
    """Create or extend the stream `routing.stream`; returns `[stream]` if created now."""
    wanted = stream_subjects(routing.subject_prefix, subjects)
    limits: dict[str, Any] = {
        "max_age": routing.stream_max_age_s,
        "max_bytes": routing.stream_max_bytes,
        "duplicate_window": routing.duplicate_window_s,
        "num_replicas": routing.replication_factor,
    }
    try:
        info = await js.stream_info(routing.stream)
    except NotFoundError:
        config = StreamConfig(
            name=routing.stream, subjects=wanted, storage=StorageType.FILE, **limits
        )
        await js.add_stream(config)
        log.info("created stream %s capturing %s", routing.stream, ", ".join(wanted))
        return [routing.stream]
    current = info.config
    have = list(current.subjects or [])
    missing = [s for s in wanted if not any(_covers(h, s) for h in have)]
    changed = {k: v for k, v in limits.items() if getattr(current, k) != v}
    if missing or changed:
        await js.update_stream(current.evolve(subjects=have + missing, **limits))
        log.info("updated stream %s: %s", routing.stream, ", ".join([*missing, *changed]))
    return []


def _covers(pattern: str, subject: str) -> bool:
    """Does the subject filter `pattern` (with `*` and `>`) match every message of `subject`?"""
    want, have = pattern.split("."), subject.split(".")
    for i, part in enumerate(want):
        if part == ">":
            return len(have) > i
        if i >= len(have) or (part not in ("*", have[i])):
            return False
    return len(want) == len(have)
