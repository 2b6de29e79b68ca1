"""Dead letters on Kafka: read the `<topic>.dlq` topics, and replay them safely.

Each replay is written to a compacted ledger topic (`retry.replay_ledger_topic`), so the
same dead letter is not replayed twice unless forced. The record, filter and replay
headers are the runtime's (`consumer.core`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from opentelemetry import trace
from opentelemetry.trace import TracerProvider

from consumer.core import DeadLetterFilter, DeadLetterRecord, ReplayResult, Settings
from consumer.runtime import replay_records
from producer.kafka import kafka_client_options, kafka_replication, start_client
from producer.tracecontext import recording_provider

_DRAIN_POLL_MS = 500


async def read_topics(settings: Settings, topics: Sequence[str]) -> list[DeadLetterRecord]:
    """Every record of `topics` up to their current end (no consumer group, no commits)."""
    consumer = AIOKafkaConsumer(
        **kafka_client_options(settings.kafka), group_id=None, enable_auto_commit=False
    )
    await start_client(consumer, settings.kafka)
    records: list[DeadLetterRecord] = []
    try:
        await consumer._client.force_metadata_update()
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        if not partitions:
            return []
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        remaining = {tp for tp, end in ends.items() if end > 0}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=_DRAIN_POLL_MS)
            for messages in batch.values():
                records.extend(_record(m) for m in messages)
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
    return records


def _record(m: ConsumerRecord[bytes, bytes]) -> DeadLetterRecord:
    stamp = datetime.fromtimestamp(m.timestamp / 1000, UTC)
    headers = tuple(m.headers or ())
    return DeadLetterRecord(m.topic, m.partition, m.offset, stamp, m.key, headers, m.value or b"")


async def list_dead_letters(
    settings: Settings, topics: Sequence[str], where: DeadLetterFilter
) -> list[DeadLetterRecord]:
    return [record for record in await read_topics(settings, topics) if where.matches(record)]


class ReplayLedger:
    """Which dead letters were replayed: a compacted topic keyed by dead letter id."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.topic = settings.retry.replay_ledger_topic

    async def ensure(self) -> None:
        admin = AIOKafkaAdminClient(**kafka_client_options(self._settings.kafka))
        await start_client(admin, self._settings.kafka)
        try:
            if self.topic in await admin.list_topics():
                return
            replicas, config = await kafka_replication(admin, self._settings.routing)
            config = {**config, "cleanup.policy": "compact"}
            topic = NewTopic(self.topic, 1, replicas, topic_configs=config)
            with contextlib.suppress(TopicAlreadyExistsError):  # created concurrently
                await admin.create_topics([topic])
        finally:
            await admin.close()

    async def load(self) -> dict[str, dict[str, str]]:
        entries: dict[str, dict[str, str]] = {}
        for record in await read_topics(self._settings, [self.topic]):
            if record.key is not None:
                entries[record.key.decode()] = json.loads(record.value) if record.value else {}
        return entries


async def replay(
    settings: Settings,
    records: Iterable[DeadLetterRecord],
    *,
    force: bool = False,
    dry_run: bool = False,
    rate_per_s: float = 50.0,
    tracer_provider: TracerProvider | None = None,
) -> list[ReplayResult]:
    """Republish `records` to their main topics; see the module docstring. With tracing
    on (`tracer_provider`, default the global one), each replay is a PRODUCER span linked
    to the job's origin, its last failed attempt and its dead-lettering."""
    provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
    tracer = provider.get_tracer("jobstream.replay") if recording_provider(provider) else None
    ledger = ReplayLedger(settings)
    await ledger.ensure()
    done = await ledger.load()
    producer = AIOKafkaProducer(
        **kafka_client_options(settings.kafka), acks="all", enable_idempotence=True
    )

    async def send(
        topic: str, key: bytes | None, headers: list[tuple[str, bytes]], value: bytes
    ) -> None:
        await producer.send_and_wait(topic, value, key=key, headers=headers)

    await start_client(producer, settings.kafka)
    try:
        return await replay_records(
            settings,
            records,
            replayed=done.keys(),
            send=send,
            system="kafka",
            tracer=tracer,
            force=force,
            dry_run=dry_run,
            rate_per_s=rate_per_s,
        )
    finally:
        await producer.stop()
