"""Cut-offs: the worker ending runs unfinished (drain timeout, revoke timeout, a simulated
crash), and the record that says so.

`CutOffs.cut_off` writes the reason on the run (`JobRun.cut_off`) before it cancels the
run's task, so whatever the handler returns afterwards, the worker does not settle the run.
`CutOffs.ended` waits for cut-off runs for a bounded time (the handler's grace plus
`CLEANUP_S` for the outer steps) and keeps the runs that did not end in `stuck`, logged
with their jobs, until they do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from consumer.core import Delivery, JobRun
from consumer.steps import AbandonedRun, HandlerStep

log = logging.getLogger("jobstream.worker")

CLEANUP_S = 1.0
"""After the handler step gave up on a cut-off handler (`cancel_grace_s`): how long the
outer steps may take to end the run (give the claim up, log, end the span)."""


@dataclass(slots=True)
class Running:
    """A delivery whose run has started, as the worker tracks it until its task ends."""

    delivery: Delivery
    run: JobRun
    task: asyncio.Task[None] | None = None


class CutOffs:
    def __init__(self) -> None:
        self.stuck: dict[int, AbandonedRun] = {}
        """Cut-off runs whose task did not end in time, by task; each leaves when it ends."""

    def cut_off(self, entries: Iterable[Running], reason: str, handler: HandlerStep | None) -> None:
        """Record that the runtime ends these runs unfinished, then cancel them: from here
        on, nothing they return settles them."""
        for entry in list(entries):
            if entry.run.cut_off is not None or entry.task is None or entry.task.done():
                continue
            entry.run.cut_off = reason
            if handler is not None:
                handler.interrupt(entry.run)
            log.warning(
                "job cut off by the %s, it will be redelivered: %s", reason, entry.delivery.describe
            )
            entry.task.cancel()

    async def ended(self, entries: Iterable[Running], grace_s: float) -> None:
        """Wait, boundedly, for cut-off runs to end; report those that do not."""
        tasks = {entry.task: entry for entry in entries if entry.task is not None}
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=grace_s + CLEANUP_S)
        for task in late:
            entry = tasks[task]
            attributes = entry.run.attributes
            stuck = AbandonedRun(
                attributes.id if attributes is not None else None,
                entry.delivery.describe,
                "task",
                entry.run.cut_off or "cut off",
            )
            self.stuck[id(task)] = stuck
            task.add_done_callback(lambda done: self.stuck.pop(id(done), None))
            log.warning("abandoned job %s (%s): its run did not end", stuck.job_id, stuck.delivery)
