"""The worker's `scheduled` states: a delayed job published without the ingress (a
producer's `publish(not_before=...)`, the CLI) shows `scheduled`, with its `not_before`,
from the moment a worker set it aside until one starts it.

The source notes each delayed first attempt it sets aside (`consumer.core.Deferrals`:
Kafka and memory when a main-topic record moves to a tier or is held until due, NATS
when it is handed to the server's scheduler); `record_scheduled` writes them to the
status store in the background, off the per-job path. A write never replaces a later
state (`_merge`: a job already `running` stays so), each is bounded by `_WRITE_TIMEOUT_S`,
and a store that does not answer costs a warning, never the job: status is an
observation. Only first attempts are noted (a waiting retry is `retrying` already); a
job moved on from tier to tier is noted once, when it left its main topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from consumer.core import Deferrals
from consumer.stores import JobState, StatusStore

__all__ = ["record_scheduled"]

log = logging.getLogger("jobstream.status")
_EVERY_S = 0.25
_WRITE_TIMEOUT_S = 2.0


async def record_scheduled(
    deferrals: Deferrals, status: StatusStore, stopping: asyncio.Event
) -> None:
    """Until `stopping` is set: every `_EVERY_S`, write `scheduled` for each job
    `deferrals` noted. Turns `deferrals` on for as long as it runs."""
    deferrals.enabled = True
    try:
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), _EVERY_S)
            for attributes in deferrals.take():
                try:
                    async with asyncio.timeout(_WRITE_TIMEOUT_S):
                        await status.record(
                            attributes.id,
                            JobState.SCHEDULED,
                            job_type=attributes.type,
                            not_before=attributes.not_before,
                        )
                except Exception:  # the job waits all the same; only its status is missing
                    log.warning(
                        "could not record job %s as scheduled", attributes.id, exc_info=True
                    )
    finally:
        deferrals.enabled = False
