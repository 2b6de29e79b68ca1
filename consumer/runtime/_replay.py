"""Replaying dead letters as records (Kafka, memory): one loop for every backend whose
retries and dead letters are topic records.

Each dead letter goes back to its job's main topic with `replay_headers` (attempt reset,
failure details removed, marked as a replay), once: a ledger keyed by the dead letter's id
records each replay, and a dead letter found there is skipped unless forced. With tracing
on, each replay is a PRODUCER span linked to the job's origin, its last failed attempt and
its dead-lettering. The backend supplies how a record is sent and how the ledger is
written; `consumer.nats` replays by subject and KV bucket instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Collection, Iterable
from datetime import UTC, datetime

from opentelemetry.trace import Tracer

from consumer.core import DeadLetterRecord, ReplayResult, Settings, replay_headers
from consumer.telemetry import replaying, retrace
from schemas import UnreadableRecord
from schemas.names import REDUCED, SOURCE_TOPIC

SendRecord = Callable[[str, bytes | None, list[tuple[str, bytes]], bytes], Awaitable[object]]
"""(topic, key, headers, value) -> the broker acknowledged it."""


async def replay_records(
    settings: Settings,
    records: Iterable[DeadLetterRecord],
    *,
    replayed: Collection[str],
    send: SendRecord,
    system: str,
    tracer: Tracer | None,
    force: bool = False,
    dry_run: bool = False,
    rate_per_s: float = 50.0,
) -> list[ReplayResult]:
    """Republish `records`; `replayed`: the ids the ledger holds. Each replay is sent, then
    written to `settings.retry.replay_ledger_topic` (key: the dead letter's id), then paced
    to at most `rate_per_s` per second."""
    done = set(replayed)
    results: list[ReplayResult] = []
    for record in records:
        destination = settings.retry.main_topic(record.ext(SOURCE_TOPIC) or "")
        if not destination:
            destination = record.topic.removesuffix(settings.retry.dead_letter_suffix)
        if record.id in done and not force:
            results.append(ReplayResult(record, "already-replayed", destination))
            continue
        if record.ext(REDUCED) or record.reason == UnreadableRecord.reason:
            # Its original body or headers were never stored (or never read): no job.
            results.append(ReplayResult(record, "reduced", destination))
            continue
        if dry_run:
            results.append(ReplayResult(record, "would-replay", destination))
            continue
        with contextlib.ExitStack() as span:
            headers = replay_headers(record)
            if tracer is not None:
                hand_off = span.enter_context(
                    replaying(tracer, system, destination, record.header, record.id)
                )
                headers = retrace(headers, hand_off)
            await send(destination, record.key, headers, record.value)
        replayed_at = datetime.now(UTC).isoformat()
        entry = {"replayed_at": replayed_at, "job_id": record.job_id or "", "to": destination}
        ledger = settings.retry.replay_ledger_topic
        await send(ledger, record.id.encode(), [], json.dumps(entry).encode())
        done.add(record.id)
        results.append(ReplayResult(record, "replayed", destination))
        await asyncio.sleep(1 / rate_per_s)
    return results
