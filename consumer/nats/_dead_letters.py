"""Dead letters on NATS JetStream: read them back from the dead-letter stream, and replay
them to the subject they came from. A KV bucket (`jetstream.replay_ledger_bucket`) records
each replay so that it happens once unless forced.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from opentelemetry import trace

from consumer.core import (
    FAILURE_EXTENSIONS,
    REPLAY_OF,
    SOURCE_TOPIC,
    DeadLetterFilter,
    DeadLetterRecord,
    ReplayResult,
    Settings,
)
from consumer.nats._provision import ensure_replay_ledger
from consumer.telemetry import replaying, retrace
from producer.nats import connect_nats
from producer.tracecontext import recording_provider
from schemas.names import REDUCED

_READ_BATCH = 256


async def list_nats_dead_letters(
    settings: Settings, subjects: Sequence[str], where: DeadLetterFilter
) -> list[DeadLetterRecord]:
    """The dead letters on `subjects` (all of the stream if empty) that match `where`."""
    client = await connect_nats(settings.nats)
    try:
        records = await _read(client.jetstream(), settings, subjects)
    finally:
        await client.close()
    return [record for record in records if where.matches(record)]


async def _read(
    js: JetStreamContext, settings: Settings, subjects: Sequence[str]
) -> list[DeadLetterRecord]:
    stream = settings.jetstream.dead_letter_stream_for(settings.routing.stream)
    name = f"jobstream-dlq-reader-{uuid.uuid4().hex[:8]}"
    config = ConsumerConfig(
        name=name,
        ack_policy=AckPolicy.NONE,
        filter_subjects=list(subjects) or None,
        inactive_threshold=60.0,
        mem_storage=True,
    )
    total = (await js.add_consumer(stream, config)).num_pending or 0
    records: list[DeadLetterRecord] = []
    try:
        subscription = await js.pull_subscribe_bind(name, stream=stream)
        while len(records) < total:
            wanted = min(total - len(records), _READ_BATCH)
            for msg in await subscription.fetch(wanted, timeout=5):
                meta, headers = msg.metadata, msg.headers or {}
                record = DeadLetterRecord(
                    topic=msg.subject,
                    partition=0,
                    offset=meta.sequence.stream,
                    timestamp=meta.timestamp,
                    key=None,
                    value=msg.data,
                    stream=stream,
                    headers=tuple((k, v.encode()) for k, v in headers.items()),
                )
                records.append(record)
        await subscription.unsubscribe()
    finally:
        await js.delete_consumer(stream, name)
    return records


async def replay_nats(
    settings: Settings,
    records: Iterable[DeadLetterRecord],
    *,
    force: bool = False,
    dry_run: bool = False,
    rate_per_s: float = 50.0,
) -> list[ReplayResult]:
    """Republish dead letters to the subject they were consumed from, attempt reset,
    failure details removed, marked as replays; once each unless `force`."""
    provider = trace.get_tracer_provider()
    tracer = provider.get_tracer("jobstream.replay") if recording_provider(provider) else None
    client = await connect_nats(settings.nats)
    results: list[ReplayResult] = []
    try:
        js = client.jetstream(timeout=settings.nats.publish_timeout_s)
        await ensure_replay_ledger(js, settings)
        ledger = await js.key_value(settings.jetstream.replay_ledger_bucket)
        for record in records:
            destination = record.ext(SOURCE_TOPIC) or record.topic.removeprefix(
                settings.jetstream.dead_letter_prefix
            )
            key = base64.urlsafe_b64encode(record.id.encode()).decode().rstrip("=")
            if not force and await _replayed(ledger, key):
                results.append(ReplayResult(record, "already-replayed", destination))
                continue
            if record.ext(REDUCED):  # its original body or headers were never stored
                results.append(ReplayResult(record, "reduced", destination))
                continue
            if dry_run:
                results.append(ReplayResult(record, "would-replay", destination))
                continue
            headers = nats_replay_headers(record, forced=force)
            with contextlib.ExitStack() as span:
                if tracer is not None:
                    # The replay span, linked like Kafka's (`replaying` reads Kafka names).
                    def kafka_named(name: str, record: DeadLetterRecord = record) -> str | None:
                        return record.header("ce-" + name[3:] if name.startswith("ce_") else name)

                    hand_off = span.enter_context(
                        replaying(tracer, "nats", destination, kafka_named, record.id)
                    )
                    pairs = retrace([(k, v.encode()) for k, v in headers.items()], hand_off, "ce-")
                    headers = {name: value.decode() for name, value in pairs}
                await js.publish(destination, record.value, headers=headers)
            entry = {
                "replayed_at": datetime.now(UTC).isoformat(),
                "job_id": record.job_id or "",
                "to": destination,
            }
            await ledger.put(key, json.dumps(entry).encode())
            results.append(ReplayResult(record, "replayed", destination))
            await asyncio.sleep(1 / rate_per_s)
    finally:
        await client.close()
    return results


async def _replayed(ledger: KeyValue, key: str) -> bool:
    try:
        await ledger.get(key)
    except KeyNotFoundError:
        return False
    return True


def nats_replay_headers(record: DeadLetterRecord, *, forced: bool) -> dict[str, str]:
    """The dead letter's headers for a fresh run: failure details out, attempt 1, marked as
    a replay, with a new `Nats-Msg-Id` (the job id would be dropped as a repeat)."""
    dropped = {
        f"ce-{name}"
        for name in (*FAILURE_EXTENSIONS, "jobattempt", "jobnotbefore", "jobidemkey", REPLAY_OF)
    } | {"nats-msg-id"}
    headers = {
        name: value.decode() for name, value in record.headers if name.lower() not in dropped
    }
    idempotency_key = record.ext("jobidemkey") or record.job_id or record.id
    msg_id = f"{record.job_id or record.id}#replay:{record.id}"
    return headers | {
        "ce-jobattempt": "1",
        "ce-jobidemkey": f"{idempotency_key}#replay:{record.id}",
        f"ce-{REPLAY_OF}": record.id,
        "Nats-Msg-Id": f"{msg_id}#{uuid.uuid4().hex[:8]}" if forced else msg_id,
    }
