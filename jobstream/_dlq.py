"""Dead letters for `jobstream dlq` and the dashboard: one way to find, show and replay
them, over the backend the settings name (`consumer.backend_for`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from consumer import Settings, backend_for
from consumer.core import DeadLetterFilter, DeadLetterRecord, ReplayResult, unescape
from schemas import default_registry

__all__ = ["default_destinations", "find", "full", "replay"]


def default_destinations(settings: Settings) -> list[str]:
    """The dead-letter topics (NATS: subjects) of every registered job type (the job
    modules imported); empty when none is registered."""
    types = default_registry.job_types()
    if not types:
        return []
    return backend_for(settings.transport).dead_letter_destinations(settings, types)


async def find(
    settings: Settings, destinations: Sequence[str], where: DeadLetterFilter
) -> list[DeadLetterRecord]:
    """The dead letters in `destinations` matching `where`, oldest first."""
    return await backend_for(settings.transport).find_dead_letters(settings, destinations, where)


async def replay(
    settings: Settings,
    records: Iterable[DeadLetterRecord],
    *,
    force: bool,
    dry_run: bool,
    rate: float,
) -> list[ReplayResult]:
    """Republish `records` to their main destinations, attempts reset, once each unless
    `force` (the backend's replay ledger); `dry_run` says what would happen."""
    backend = backend_for(settings.transport)
    return await backend.replay(settings, records, force=force, dry_run=dry_run, rate_per_s=rate)


def full(record: DeadLetterRecord) -> dict[str, object]:
    """A dead letter for display: its summary, traceback, every header, key and body (JSON
    when it parses, else text with undecodable bytes replaced)."""
    try:
        body: object = json.loads(record.value)
    except ValueError:
        body = record.value.decode("utf-8", errors="replace")
    headers = {name: value.decode("utf-8", errors="replace") for name, value in record.headers}
    key = record.key.decode("utf-8", errors="replace") if record.key else None
    trace = unescape(record.ext("jobtraceback") or "")
    return {**record.summary(), "traceback": trace, "headers": headers, "key": key, "body": body}
