"""The worker's report to the status store, for the dashboard's live view: every
`REPORT_EVERY_S`, its jobs in flight and, per partition (Kafka) or consumer (NATS) it
holds, the messages not yet settled (the same backlog as the `jobstream.consumer.lag`
metric), retry tiers marked. The dashboard runs in the ingress, which holds no partition:
only the workers see their lag, so they write it where the ingress reads job status. A
report expires on its own (`WORKER_REPORT_TTL_S`); a write that fails costs a debug line,
never the worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from consumer.core import RetrySettings, utc_now
from consumer.stores import PartitionBacklog, StatusStore, WorkerReport
from consumer.telemetry import ReportsBacklog

__all__ = ["report_worker"]

log = logging.getLogger("jobstream.status")
REPORT_EVERY_S = 2.0


async def report_worker(
    status: StatusStore,
    identity: tuple[str, str, str],
    source: object,
    in_flight: Callable[[], int],
    retry: RetrySettings,
    stopping: asyncio.Event,
) -> None:
    """Until `stopping` is set, report (worker, group, transport) = `identity` every
    `REPORT_EVERY_S`; `source`'s backlog if it reports one."""
    worker, group, transport = identity
    while not stopping.is_set():
        backlog: list[PartitionBacklog] = []
        try:
            async with asyncio.timeout(REPORT_EVERY_S):
                if isinstance(source, ReportsBacklog):
                    backlog = [
                        PartitionBacklog(
                            destination=entry.destination,
                            partition=entry.partition,
                            messages=entry.messages,
                            tier=retry.main_topic(entry.destination) != entry.destination,
                        )
                        for entry in await source.backlog()
                    ]
                report = WorkerReport(
                    worker=worker,
                    group=group,
                    transport=transport,
                    in_flight=in_flight(),
                    reported_at=utc_now(),
                    backlog=tuple(backlog),
                )
                await status.report_worker(report)
        except Exception as error:  # noqa: BLE001 - a report must never hurt the worker
            log.debug("could not report to the status store: %s", error)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), REPORT_EVERY_S)
