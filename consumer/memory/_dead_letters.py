"""Dead letters in a `MemoryBroker`: read the `<topic>.dlq` topics, and replay them once.

As on Kafka, each replay is recorded in a ledger topic (`retry.replay_ledger_topic`, one
partition, keyed by dead letter id; the last entry of a key counts, as after compaction),
so the same dead letter is not replayed twice unless forced. The record, filter and
replay headers are the runtime's (`consumer.core`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from opentelemetry import trace

from consumer.core import DeadLetterFilter, DeadLetterRecord, ReplayResult, Settings
from consumer.runtime import replay_records
from producer.memory import MemoryBroker, MemoryRecord
from producer.tracecontext import recording_provider

__all__ = ["list_dead_letters", "read_topics", "replay"]


def read_topics(broker: MemoryBroker, topics: Sequence[str]) -> list[DeadLetterRecord]:
    """Every record of `topics` (those that exist), partition by partition, oldest first."""
    records: list[DeadLetterRecord] = []
    for topic in topics:
        if topic not in broker.topics():
            continue
        for partition in range(broker.partitions(topic)):
            end = broker.end_offset(topic, partition)
            records.extend(_record(r) for r in broker.read(topic, partition, 0, end))
    return records


def list_dead_letters(
    broker: MemoryBroker, topics: Sequence[str], where: DeadLetterFilter
) -> list[DeadLetterRecord]:
    """The dead letters in `topics` that match `where`."""
    return [record for record in read_topics(broker, topics) if where.matches(record)]


async def replay(
    broker: MemoryBroker,
    settings: Settings,
    records: Iterable[DeadLetterRecord],
    *,
    force: bool = False,
    dry_run: bool = False,
    rate_per_s: float = 50.0,
) -> list[ReplayResult]:
    """Republish `records` to their main topics, once each unless `force` (see the module
    docstring), at most `rate_per_s` per second. With tracing on (the global provider),
    each replay is a PRODUCER span linked to the job's origin and its failure."""
    provider = trace.get_tracer_provider()
    tracer = provider.get_tracer("jobstream.replay") if recording_provider(provider) else None
    ledger = settings.retry.replay_ledger_topic
    broker.create_topic(ledger, 1)
    done = {r.key.decode() for r in read_topics(broker, [ledger]) if r.key is not None}

    async def send(
        topic: str, key: bytes | None, headers: list[tuple[str, bytes]], value: bytes
    ) -> None:
        await broker.append(topic, key, headers, value)

    return await replay_records(
        settings,
        records,
        replayed=done,
        send=send,
        system="memory",
        tracer=tracer,
        force=force,
        dry_run=dry_run,
        rate_per_s=rate_per_s,
    )


def _record(r: MemoryRecord) -> DeadLetterRecord:
    return DeadLetterRecord(r.topic, r.partition, r.offset, r.timestamp, r.key, r.headers, r.value)
