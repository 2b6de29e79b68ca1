"""Failure routing on NATS JetStream: delayed redelivery, the dead-letter stream, replay.

- A retriable failure is handed back to JetStream with `nak(delay)`, the delay computed by
  the retry policy (never a bare `nak`: it redelivers at once and burns `max_deliver`).
  The nak is confirmed by the server before the job counts as settled; the next attempt is
  the next delivery (`attempt` = delivery count).
- A non-retriable failure, or the last attempt, is published to the dead-letter stream
  (`<routing.stream>_DLQ`, subject `<dead_letter_prefix><subject>`) with the original
  headers and body plus the failure details as `ce-job*` headers, the same names and
  values as the `ce_job*` headers on Kafka (`consumer._failures`). Only after JetStream
  stored it (PubAck) does the source `term` the original. The copy's `Nats-Msg-Id` is the
  original's stream position, so a crash between the two does not store it twice within
  the dead-letter stream's duplicate window.
- Dead letters are read back from that stream, and replayed to the subject they came from;
  a KV bucket (`jetstream.replay_ledger_bucket`) records each replay so that it happens
  once unless forced.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue
from opentelemetry import trace
from opentelemetry.trace import Tracer

from consumer._dead_letters import DeadLetterFilter, DeadLetterRecord, ReplayResult
from consumer._failures import (
    FAILURE_EXTENSIONS,
    REASON,
    REPLAY_OF,
    SOURCE_TOPIC,
    Decision,
    failure_details,
    utc_now,
)
from consumer._nats_source import NatsSource
from consumer._outcome import Outcome
from consumer._pipeline import JobRun
from consumer._routing import until_acknowledged
from consumer._settings import Settings
from consumer._step_tracing import handing_off, replaying, retrace
from producer import NatsPublisher, connect_nats
from producer._provision import ensure_nats_stream
from producer._tracecontext import recording_provider

log = logging.getLogger("jobstream.routing")
_MAX_BACKOFF_S = 10.0
_READ_BATCH = 256


class NatsFailureRouter:
    def __init__(
        self, settings: Settings, publisher: NatsPublisher, source: NatsSource,
        tracer: Tracer | None = None,
    ) -> None:  # fmt: skip
        """`tracer`: record the dead-letter hand-off span (None when tracing is off)."""
        self._settings = settings
        self._publisher = publisher
        self._source = source
        self._tracer = tracer

    async def route(self, run: JobRun, error: Exception, decision: Decision) -> Outcome:
        delivery, attributes = run.delivery, run.attributes
        if decision.retry and attributes is not None:
            confirmed = await self._source.nak(delivery, decision.delay_s)
            log.info(
                "retry %d of %s in %.1fs%s", attributes.attempt + 1, attributes.id,
                decision.delay_s, "" if confirmed else " (nak unconfirmed: after the ack wait)",
            )  # fmt: skip
            return Outcome.RETRYING
        details = failure_details(run, error, decision, self._settings.worker.group, utc_now())
        jet = self._settings.jetstream
        subject = jet.dead_letter_subject(self._source.main_subject(delivery))
        headers = {
            name: value.decode() for name, value in delivery.raw_headers
            if name.lower() not in _REPLACED
        }  # fmt: skip
        attempt = attributes.attempt if attributes else delivery.delivery_count
        headers["ce-jobattempt"] = str(attempt)
        headers |= {f"ce-{name}": value for name, value in details.items()}
        headers["Nats-Msg-Id"] = f"dlq:{self._settings.routing.stream}:{delivery.offset}"
        if self._tracer is None:
            await until_acknowledged(
                lambda: self._publisher.send_raw(subject, headers, delivery.body)
            )
        else:
            # A retry is a `nak` of the same message (no new record to trace); the dead
            # letter is a new record: its own span, linked to the origin and the attempt.
            with handing_off(
                self._tracer, "nats", subject, attributes, details[REASON]
            ) as hand_off:
                pairs = retrace([(k, v.encode()) for k, v in headers.items()], hand_off, "ce-")
                traced = {name: value.decode() for name, value in pairs}
                await until_acknowledged(
                    lambda: self._publisher.send_raw(subject, traced, delivery.body)
                )
        log.warning("dead-lettered %s to %s: %s", delivery.describe, subject, decision.reason)
        return Outcome.DEAD_LETTERED


# Headers of the original that a dead letter replaces: earlier details, the attempt, the id.
_REPLACED = {f"ce-{name}" for name in (*FAILURE_EXTENSIONS, "jobattempt")} | {"nats-msg-id"}


def dead_letter_subjects(settings: Settings, subjects: Iterable[str]) -> list[str]:
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
                bucket=bucket, history=1, storage=StorageType.FILE,
                replicas=settings.routing.replication_factor,
                description="jobstream: dead letters that were replayed",
            )
        )  # fmt: skip


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
        name=name, ack_policy=AckPolicy.NONE, filter_subjects=list(subjects) or None,
        inactive_threshold=60.0, mem_storage=True,
    )  # fmt: skip
    total = (await js.add_consumer(stream, config)).num_pending or 0
    records: list[DeadLetterRecord] = []
    try:
        subscription = await js.pull_subscribe_bind(name, stream=stream)
        while len(records) < total:
            wanted = min(total - len(records), _READ_BATCH)
            for msg in await subscription.fetch(wanted, timeout=5):
                meta, headers = msg.metadata, msg.headers or {}
                records.append(DeadLetterRecord(
                    topic=msg.subject, partition=0, offset=meta.sequence.stream,
                    timestamp=meta.timestamp, key=None, value=msg.data, stream=stream,
                    headers=tuple((k, v.encode()) for k, v in headers.items()),
                ))  # fmt: skip
        await subscription.unsubscribe()
    finally:
        await js.delete_consumer(stream, name)
    return records


async def replay_nats(
    settings: Settings, records: Iterable[DeadLetterRecord], *,
    force: bool = False, dry_run: bool = False, rate_per_s: float = 50.0,
) -> list[ReplayResult]:  # fmt: skip
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
            entry = {"replayed_at": datetime.now(UTC).isoformat(),
                     "job_id": record.job_id or "", "to": destination}  # fmt: skip
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
