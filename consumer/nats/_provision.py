"""The JetStream side of a worker group: its durable consumers, the stream's subjects and
key partition count, the dead-letter stream and the replay ledger bucket. Used by the
worker at start (create or update: every replica has the same settings) and by `jobstream
topics ensure --transport nats`; docs/nats.md explains each setting.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig, StorageType
from nats.js.errors import APIError, BucketNotFoundError

from consumer.core import Settings, WorkerError
from consumer.nats._schedules import schedule_subjects
from producer import PRIORITIES, destination_level
from producer.nats import KEY_PARTITIONS_METADATA, ensure_nats_stream

log = logging.getLogger("jobstream.nats")


def max_deliver(settings: Settings) -> int:
    """Deliveries JetStream makes of one message: the largest `max_attempts` plus the margin
    for redeliveries that are not failures."""
    retry = settings.retry
    attempts = max([retry.policy.max_attempts, *(p.max_attempts for p in retry.per_type.values())])
    return attempts + settings.jetstream.max_deliver_margin


class PlannedConsumer(NamedTuple):
    """A durable consumer of the group, and what the source needs to pull from it."""

    config: ConsumerConfig
    level: int
    """Its priority level: the index in `PRIORITIES` (0 is `high`) with
    `routing.priorities`, else 0 (one level)."""
    partitioned: bool
    """A key partition consumer (`max_ack_pending` 1, one message at a time)."""


def consumer_plan(settings: Settings, subjects: Sequence[str]) -> list[ConsumerConfig]:
    """The durable consumers of the group (`planned_consumers`)."""
    return [planned.config for planned in planned_consumers(settings, subjects)]


def planned_consumers(settings: Settings, subjects: Sequence[str]) -> list[PlannedConsumer]:
    """The durable consumers of the group, per priority level (highest first): one on the
    level's subjects and, with key partitions, one per partition (`-p<n>` on
    `<subject>.<n>`, one job at a time). The normal level's are `<group>` and
    `<group>-p<n>` (the names without priorities); with `routing.priorities` the high and
    low levels get `<group>-high` and `<group>-low` on `<subject>.priority-<level>` (and
    `<group>-high-p<n>` on `<subject>.priority-high.<n>`). Every filter is a literal
    subject, so a level's consumers never see another level's messages."""
    group, jet = settings.worker.group, settings.jetstream
    if not group or any(ch in group for ch in ".*> \t/\\"):
        msg = (
            f"worker.group {group!r} cannot name a JetStream consumer: "
            "use no '.', '*', '>', '/' or spaces"
        )
        raise WorkerError(msg)

    def config(name: str, filters: list[str], pending: int) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=name,
            name=name,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=jet.ack_wait_s,
            max_ack_pending=pending,
            max_deliver=max_deliver(settings),
            filter_subjects=filters,
            description=f"jobstream workers of group {group}",
        )

    levels: dict[int, list[str]] = {}
    for subject in sorted(subjects):
        level = PRIORITIES.index(destination_level(subject)[1])
        levels.setdefault(level if settings.routing.priorities else 0, []).append(subject)
    plan: list[PlannedConsumer] = []
    for level, filters in sorted(levels.items()):
        name = group
        if settings.routing.priorities and PRIORITIES[level] != "normal":
            name = f"{group}-{PRIORITIES[level]}"
        # Jobs published to a bare subject of a partitioned stream (a producer that does not
        # partition) are still processed, without an order promise.
        plan.append(PlannedConsumer(config(name, filters, jet.max_ack_pending), level, False))
        for n in range(jet.key_partitions):
            partition = config(f"{name}-p{n}", [f"{s}.{n}" for s in filters], 1)
            plan.append(PlannedConsumer(partition, level, True))
    return plan


def stream_destinations(settings: Settings, subjects: Sequence[str]) -> list[str]:
    """What the stream must capture: the subjects (every level's, with priorities), their
    schedule messages (`<subject>._scheduled.>`, the job type's subject) and, with key
    partitions, `<subject>.*`."""
    partitions = [f"{s}.*" for s in subjects] if settings.jetstream.key_partitions else []
    bases = list(subjects)
    if settings.routing.priorities:  # a level's delayed jobs wait on its job type's subject
        bases = list(dict.fromkeys(destination_level(s)[0] for s in subjects))
    return [*subjects, *partitions, *schedule_subjects(bases)]


async def ensure_key_partitions(js: JetStreamContext, settings: Settings) -> None:
    """Record `jetstream.key_partitions` in the stream's metadata, where producers read it."""
    info = await js.stream_info(settings.routing.stream)
    metadata = dict(info.config.metadata or {})
    wanted = str(settings.jetstream.key_partitions)
    if metadata.get(KEY_PARTITIONS_METADATA, "0") != wanted:
        metadata[KEY_PARTITIONS_METADATA] = wanted
        await js.update_stream(info.config.evolve(metadata=metadata))
        log.info("stream %s: %s key partitions", settings.routing.stream, wanted)


async def ensure_consumers(
    js: JetStreamContext, settings: Settings, subjects: Sequence[str]
) -> list[str]:
    """Create or update the group's consumers (same settings on every replica); their names."""
    names = []
    for config in consumer_plan(settings, subjects):
        try:
            await js.add_consumer(settings.routing.stream, config)
        except APIError as error:
            msg = (
                f"JetStream refused consumer {config.name!r} on stream {settings.routing.stream!r}"
                f" for {', '.join(config.filter_subjects or [])}: {error.description}; run "
                "`jobstream topics ensure --transport nats`"
            )
            raise WorkerError(msg) from error
        names.append(config.name or "")
    return names


def dead_letter_subjects(settings: Settings, subjects: Iterable[str]) -> list[str]:
    """The dead-letter subjects of `subjects`: one per job type, every level's dead letters
    on the normal level's (`routing.priorities`)."""
    if settings.routing.priorities:
        subjects = dict.fromkeys(destination_level(subject)[0] for subject in subjects)
    return [settings.jetstream.dead_letter_subject(subject) for subject in subjects]


async def ensure_dead_letter_stream(
    js: JetStreamContext, settings: Settings, subjects: Sequence[str]
) -> list[str]:
    """Create or extend the dead-letter stream for `subjects`; `[stream]` if created now."""
    jet, routing = settings.jetstream, settings.routing
    dead_letters = routing.model_copy(
        update={
            "stream": jet.dead_letter_stream_for(routing.stream),
            "subject_prefix": jet.dead_letter_subject(routing.subject_prefix),
            "stream_max_age_s": jet.dead_letter_max_age_s,
            "stream_max_bytes": -1,
        }
    )
    return await ensure_nats_stream(js, dead_letter_subjects(settings, subjects), dead_letters)


async def ensure_replay_ledger(js: JetStreamContext, settings: Settings) -> None:
    bucket = settings.jetstream.replay_ledger_bucket
    try:
        await js.key_value(bucket)
    except BucketNotFoundError:
        await js.create_key_value(
            KeyValueConfig(
                bucket=bucket,
                history=1,
                storage=StorageType.FILE,
                replicas=settings.routing.replication_factor,
                description="jobstream: dead letters that were replayed",
            )
        )
