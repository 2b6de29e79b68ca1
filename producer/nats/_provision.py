"""Creating the JetStream stream: one stream (`RoutingSettings.stream`) capturing
`<subject_prefix>>` plus any routed subject outside that prefix, with message schedules
allowed (delayed jobs). An existing stream gets the missing subjects and the configured
limits (replicas included: JetStream moves a stream from R1 to R3 in place); its storage
type is never changed. Replicas are chosen from the cluster's size unless set."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError

from producer._settings import RoutingSettings

log = logging.getLogger("jobstream.producer")


def nats_cluster_size(client: Client) -> int:
    """Servers in the cluster of the server `client` is connected to: the client URLs it
    announced (`connect_urls` of its INFO), 1 for a server outside a cluster."""
    info = client._server_info  # nats-py keeps the INFO only here
    if not info.get("cluster"):
        return 1
    return max(len(info.get("connect_urls") or ()), 1)


def nats_replicas(client: Client, routing: RoutingSettings) -> int:
    """The replicas of streams and buckets: `routing.replicas_for` the cluster's size."""
    return routing.replicas_for(nats_cluster_size(client))[0]


def stream_subjects(prefix: str, subjects: Iterable[str]) -> list[str]:
    """The subjects a stream must capture: `<prefix>>` (when the prefix ends with a dot)
    and every subject it does not cover."""
    wildcard = [f"{prefix}>"] if prefix.endswith(".") else []
    rest = [s for s in dict.fromkeys(subjects) if not any(_covers(w, s) for w in wildcard)]
    # JetStream refuses overlapping subjects in one stream (`x.*` and a level's
    # `x.priority-high`): keep only those no other one covers.
    rest = [s for s in rest if not any(w != s and _covers(w, s) for w in rest)]
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
        "num_replicas": nats_replicas(js._nc, routing),
        # Delayed jobs wait in JetStream's message scheduler (nats-server 2.12+, ADR-51).
        "allow_msg_schedules": True,
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
        kept = [h for h in have if not any(_covers(m, h) for m in missing)]  # no overlaps
        await js.update_stream(current.evolve(subjects=kept + missing, **limits))
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
