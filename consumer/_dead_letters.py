"""Dead letters: read them, and replay them safely.

A dead letter is a record of a `<topic>.dlq` topic: the original key, body and headers of a
failed job plus its failure details (`ce_jobreason`, ...). Its id is
`<dlq topic>:<partition>:<offset>`. NATS dead letters use the same record type (`ce-`
headers, id `<stream>:<sequence>`); they are read and replayed by `consumer._nats_routing`.

Replay republishes a dead letter to the job's main topic with the attempt count reset and
the failure details removed, keeping the origin trace context, and marks it as a replay
(`ce_jobreplayof`). Its idempotency key gets a `#replay:<dead letter id>` suffix: the failed
run was recorded as final, and the replay is a new, deliberate run. Each replay is written
to a compacted ledger topic, so the same dead letter is not replayed twice unless forced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from opentelemetry import trace
from opentelemetry.trace import TracerProvider

from consumer._failures import FAILURE_EXTENSIONS, REPLAY_OF
from consumer._settings import Settings
from consumer._step_tracing import replaying, retrace
from producer import kafka_client_options
from producer._tracecontext import recording_provider

_DRAIN_POLL_MS = 500


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """One dead letter as stored, with its failure details parsed from the headers."""

    topic: str
    partition: int
    offset: int
    timestamp: datetime
    key: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    value: bytes
    stream: str | None = None
    """NATS: the dead-letter stream (the offset is the stream sequence); Kafka: None."""

    @property
    def id(self) -> str:
        """Kafka `<topic>:<partition>:<offset>`; NATS `<stream>:<sequence>`."""
        if self.stream is not None:
            return f"{self.stream}:{self.offset}"
        return f"{self.topic}:{self.partition}:{self.offset}"

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value.decode("utf-8", errors="replace")
        return None

    def ext(self, name: str) -> str | None:
        """A CloudEvents attribute: `ce_<name>` (Kafka) or `ce-<name>` (NATS)."""
        value = self.header(f"ce_{name}")
        return value if value is not None else self.header(f"ce-{name}")

    @property
    def job_id(self) -> str | None:
        return self.ext("id")

    @property
    def job_type(self) -> str | None:
        return self.ext("type")

    @property
    def reason(self) -> str:
        return self.ext("jobreason") or "unknown"

    @property
    def failed_at(self) -> datetime:
        value = self.ext("joblastfail")
        try:
            return datetime.fromisoformat(value) if value else self.timestamp
        except ValueError:
            return self.timestamp

    @property
    def source(self) -> str:
        """Where the job was first consumed: `topic[partition]@offset`."""
        topic, partition = self.ext("jobsrctopic"), self.ext("jobsrcpartition")
        return f"{topic}[{partition}]@{self.ext('jobsrcoffset')}"

    def summary(self) -> dict[str, object]:
        return {
            "id": self.id, "job_id": self.job_id, "type": self.job_type,
            "version": self.ext("jobversion"), "reason": self.reason,
            "error_type": self.ext("joberrortype"), "error": self.ext("joberror"),
            "attempts": self.ext("jobattempt"),
            "source": self.source,
            "group": self.ext("jobgroup"), "first_failure": self.ext("jobfirstfail"),
            "last_failure": self.failed_at.isoformat(),
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    job_type: str | None = None
    reason: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    ids: frozenset[str] = frozenset()

    def matches(self, record: DeadLetterRecord) -> bool:
        if self.ids and record.id not in self.ids and record.job_id not in self.ids:
            return False
        if self.job_type and record.job_type != self.job_type:
            return False
        if self.reason and record.reason != self.reason:
            return False
        failed = record.failed_at
        return not ((self.since and failed < self.since) or (self.until and failed > self.until))


@dataclass(frozen=True, slots=True)
class ReplayResult:
    record: DeadLetterRecord
    status: str  # "replayed", "would-replay" (dry run), "already-replayed"
    destination: str


async def read_topics(settings: Settings, topics: Sequence[str]) -> list[DeadLetterRecord]:
    """Every record of `topics` up to their current end (no consumer group, no commits)."""
    consumer = AIOKafkaConsumer(**kafka_client_options(settings.kafka), group_id=None,
                                enable_auto_commit=False)  # fmt: skip
    await consumer.start()
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
        await admin.start()
        try:
            if self.topic in await admin.list_topics():
                return
            config = {"cleanup.policy": "compact"}
            topic = NewTopic(
                self.topic, 1, self._settings.routing.replication_factor, topic_configs=config
            )
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
    settings: Settings, records: Iterable[DeadLetterRecord], *,
    force: bool = False, dry_run: bool = False, rate_per_s: float = 50.0,
    tracer_provider: TracerProvider | None = None,
) -> list[ReplayResult]:  # fmt: skip
    """Republish `records` to their main topics; see the module docstring. With tracing
    on (`tracer_provider`, default the global one), each replay is a PRODUCER span linked
    to the job's origin, its last failed attempt and its dead-lettering."""
    provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
    tracer = provider.get_tracer("jobstream.replay") if recording_provider(provider) else None
    ledger = ReplayLedger(settings)
    await ledger.ensure()
    done = await ledger.load()
    results: list[ReplayResult] = []
    producer = AIOKafkaProducer(
        **kafka_client_options(settings.kafka), acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        for record in records:
            destination = settings.retry.main_topic(record.ext("jobsrctopic") or "")
            if not destination:
                destination = record.topic.removesuffix(settings.retry.dead_letter_suffix)
            if record.id in done and not force:
                results.append(ReplayResult(record, "already-replayed", destination))
                continue
            if dry_run:
                results.append(ReplayResult(record, "would-replay", destination))
                continue
            with contextlib.ExitStack() as span:
                headers = replay_headers(record)
                if tracer is not None:
                    hand_off = span.enter_context(
                        replaying(tracer, "kafka", destination, record.header, record.id)
                    )
                    headers = retrace(headers, hand_off)
                await producer.send_and_wait(
                    destination, record.value, key=record.key, headers=headers
                )
            entry = {
                "replayed_at": datetime.now(UTC).isoformat(),
                "job_id": record.job_id or "",
                "to": destination,
            }
            await producer.send_and_wait(
                ledger.topic, json.dumps(entry).encode(), key=record.id.encode()
            )
            results.append(ReplayResult(record, "replayed", destination))
            await asyncio.sleep(1 / rate_per_s)
    finally:
        await producer.stop()
    return results


def replay_headers(record: DeadLetterRecord) -> list[tuple[str, bytes]]:
    """The dead letter's headers for a fresh run: failure details out, attempt 1, marked."""
    dropped = {
        f"ce_{name}"
        for name in (*FAILURE_EXTENSIONS, "jobattempt", "jobnotbefore", "jobidemkey", REPLAY_OF)
    }
    headers = [(k, v) for k, v in record.headers if k.lower() not in dropped]
    idempotency_key = record.ext("jobidemkey") or record.job_id or record.id
    return [
        *headers,
        ("ce_jobattempt", b"1"),
        ("ce_jobidemkey", f"{idempotency_key}#replay:{record.id}".encode()),
        (f"ce_{REPLAY_OF}", record.id.encode()),
    ]


def dead_letter_destinations(settings: Settings, job_types: Iterable[str]) -> list[str]:
    """Where the dead letters of `job_types` are: Kafka topics, or JetStream subjects."""
    if settings.transport == "nats":
        subjects = {settings.routing.subject(job_type) for job_type in job_types}
        return sorted(settings.jetstream.dead_letter_subject(s) for s in subjects)
    mains = {settings.routing.topic(job_type) for job_type in job_types}
    return sorted(settings.retry.dead_letter_topic(topic) for topic in mains)


async def find_dead_letters(
    settings: Settings, destinations: Sequence[str], where: DeadLetterFilter
) -> list[DeadLetterRecord]:
    """The dead letters in `destinations` that match `where`, on either transport."""
    if settings.transport == "nats":
        from consumer._nats_routing import list_nats_dead_letters  # noqa: PLC0415 - cycle

        return await list_nats_dead_letters(settings, destinations, where)
    return await list_dead_letters(settings, destinations, where)
