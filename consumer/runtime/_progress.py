"""The worker's progress, as `/livez` and `/readyz` see it (`_health.py` serves them).

`Progress` keeps when the fetch loop last turned and asks the source when its broker last
answered (`ReportsContact`; the memory broker, in this process, is never silent). Its
`watch` loop probes a broker that has been silent for a while (an idle member fetches
nothing, a full worker asks for nothing), and logs once when readiness is lost to that
silence and once when it comes back. It decides nothing about the worker's own state
(joined, stopping, stopped by a fault): the `Worker` asks it after checking those.

`Overruns` lists the runs that make no progress of their own: still running
`cancel_grace_s` past their job's timeout (an async handler that swallows its timeout's
cancellation). Each is logged once; none is settled, so its offset is never committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from consumer.core import Settings, Source, WorkerError
from consumer.runtime._cut_offs import Running
from consumer.runtime._health import ReportsContact, Thresholds

log = logging.getLogger("jobstream.worker")


class Progress:
    """The fetch loop's last turn and the broker's last answer, against `Thresholds`."""

    def __init__(self, settings: Settings, source: Source) -> None:
        self._thresholds = Thresholds.from_settings(settings)
        self._contact = source if isinstance(source, ReportsContact) else None
        self._born = self._turned = time.monotonic()  # `_turned`: the fetch loop's last turn
        self._silent = False  # readiness lost to a silent broker (logged once each way)

    def turn(self) -> None:
        """The fetch loop turned: called once per turn."""
        self._turned = time.monotonic()

    def not_ready(self) -> str | None:
        """Why the worker is not ready, as far as progress goes, or None: the broker silent
        for longer than `health.readiness_silence_s`."""
        return self._silence(self._thresholds.ready_s, "readiness")

    def not_live(self, *, turning: bool) -> str | None:
        """Why the worker is not live, as far as progress goes, or None: no turn of the
        fetch loop (while it should be `turning`), or no answer of the broker, for
        `health.liveness_silence_s`."""
        limit = self._thresholds.live_s
        stalled = time.monotonic() - self._turned
        if turning and stalled > limit:
            return f"the fetch loop has not turned for {stalled:.0f}s (health.liveness_silence_s)"
        return self._silence(limit, "liveness")

    def _silence(self, limit_s: float, which: str) -> str | None:
        if self._contact is None:  # the memory broker lives in this process
            return None
        silent = time.monotonic() - max(self._contact.last_contact, self._born)
        if silent <= limit_s:
            return None
        return f"no answer from the broker for {silent:.0f}s (health.{which}_silence_s)"

    async def watch(self) -> None:
        """Probe a silent broker and log readiness lost and regained, until cancelled.
        Raises the `WorkerError` of a probe (e.g. a lost consumer that cannot be
        re-created): the worker stops on it."""
        every = self._thresholds.probe_every_s
        while True:
            await asyncio.sleep(every)
            contact = self._contact
            if contact is not None and time.monotonic() - contact.last_contact > every:
                try:
                    async with asyncio.timeout(every):
                        await contact.probe()
                except WorkerError as error:
                    log.error("%s", error)
                    raise
                except Exception as error:  # noqa: BLE001 - its silence is what counts
                    log.debug("broker probe failed: %r", error)
            silence = self._silence(self._thresholds.ready_s, "readiness")
            if (silence is not None) != self._silent:
                self._silent = silence is not None
                if silence is not None:
                    log.warning("not ready: %s", silence)
                else:
                    log.info("ready again: the broker answers")


class Overruns:
    """Runs still going `cancel_grace_s` past their job's timeout, by run."""

    def __init__(self, cancel_grace_s: float) -> None:
        self._grace_s = cancel_grace_s
        self._overrun: dict[int, Running] = {}

    @property
    def described(self) -> list[str]:
        """The overrunning jobs' deliveries (`topic[partition]@offset`)."""
        return [entry.delivery.describe for entry in self._overrun.values()]

    def find(self, running: Iterable[Running]) -> None:
        """Report, once each, runs of `running` still going `cancel_grace_s` past their job
        timeout; forget those that ended."""
        late = time.monotonic() - self._grace_s
        for key in [
            k for k, entry in self._overrun.items() if entry.task is None or entry.task.done()
        ]:
            del self._overrun[key]
        for entry in running:
            context = entry.run.context
            if context is None or context.deadline > late or id(entry.run) in self._overrun:
                continue
            self._overrun[id(entry.run)] = entry
            log.error(
                "job %s (%s) runs on past its timeout: its handler ignores cancellation; "
                "it holds its slot and its offset stays uncommitted until it ends",
                context.job_id,
                entry.delivery.describe,
            )
