"""The ingress's producer: connected on first use, replaced after an outage, and every
publish bounded in time, so a request's reservation is always settled within its lease.
"""

from __future__ import annotations

import asyncio
import logging
import time

from consumer import Settings
from jobstream._job_options import JobOptions
from producer import BrokerUnavailable, JobProducer, PublishError, PublishTimeout, Receipt
from schemas import Job, JobRegistry, JobstreamError

__all__ = ["PING_EVERY_S", "PING_TIMEOUT_S", "ProducerHandle"]

PING_TIMEOUT_S = 2.0
"""How long `/readyz` waits for the broker's answer to a round trip."""
PING_EVERY_S = 1.0
"""`/readyz` asks the broker at most this often; answers in between repeat the last."""

log = logging.getLogger("jobstream.ingress")
_DEFAULTS = JobOptions()


class ProducerHandle:
    """The producer, connected on first use and replaced after `BrokerUnavailable` or
    `PublishTimeout`, so the ingress starts (and answers 503) while the broker is down.
    With a spool (`spool.path`) the one producer is kept for the process: it spools while
    the broker is down and reconnects by itself, and it owns the spool file (a second
    producer on the path would be refused with `SpoolLocked`)."""

    def __init__(self, settings: Settings, registry: JobRegistry, bound_s: float) -> None:
        """`bound_s`: the longest `send` waits, connecting included (seconds)."""
        self._settings = settings
        self._registry = registry
        self._bound_s = bound_s
        self._keep = settings.spool.path is not None
        self._producer: JobProducer | None = None
        self._lock = asyncio.Lock()
        self._stopping: set[asyncio.Task[None]] = set()
        self._readiness: tuple[float, tuple[bool, str]] | None = None

    async def get(self) -> JobProducer:
        """The connected producer; `BrokerUnavailable` if it cannot connect."""
        async with self._lock:
            if self._producer is None:
                producer = JobProducer(self._settings, registry=self._registry)
                try:
                    await producer.start()
                except BaseException:  # refused, or cut off by the bound: no half-open client
                    self._stop_later(producer)
                    raise
                self._producer = producer
            return self._producer

    async def send(
        self, job: Job, *, key: str | None, job_id: str, options: JobOptions = _DEFAULTS
    ) -> Receipt:
        """Publish `job` as `job_id` with `options` (`delay`, `priority`, ...) within the
        bound; `ValueError` for an option a setting is missing for (the producer's).
        Past it: `BrokerUnavailable` while still connecting (nothing was sent),
        `PublishTimeout` once sending (the job may be stored). Either drops the producer;
        the next request connects anew."""
        producer: JobProducer | None = None
        try:
            async with asyncio.timeout(self._bound_s):
                producer = await self.get()
                return await producer.publish(
                    job, key=key, id=job_id, **options.publish_options(relative=False)
                )
        except TimeoutError:
            self.drop(producer)
            if producer is None:
                detail = f"no connection within {self._bound_s:g}s"
                raise BrokerUnavailable(self._settings.transport, "its address", detail) from None
            destination = producer.destination(job.job_type)
            raise PublishTimeout(producer.publisher.transport, destination, self._bound_s) from None
        except (BrokerUnavailable, PublishTimeout):
            self.drop(producer)
            raise

    async def ready(self) -> tuple[bool, str]:
        """Readiness, measured: the broker answered a round trip within `PING_TIMEOUT_S`
        (`Publisher.ping`), at most `PING_EVERY_S` ago. With a spool the ingress takes
        jobs while the broker is away, so it stays ready and says it spools."""
        now = time.monotonic()
        if self._readiness is not None and now - self._readiness[0] < PING_EVERY_S:
            return self._readiness[1]
        try:
            producer = await self.get()
            await producer.publisher.ping(PING_TIMEOUT_S)
            answer = (True, "ready")
        except PublishError as failure:
            if self._keep and failure.retriable:
                answer = (True, f"ready, spooling: {failure}")
            else:
                answer = (False, f"not ready: {failure}")
        except JobstreamError as failure:  # e.g. `SpoolLocked`: this replica cannot publish
            answer = (False, f"not ready: {failure}")
        self._readiness = (time.monotonic(), answer)
        return answer

    def drop(self, producer: JobProducer | None) -> None:
        """Forget `producer` if it is the current one, and stop it in the background (a
        stop may wait for a broker that does not answer; the request does not)."""
        if producer is None or producer is not self._producer or self._keep:
            return
        self._producer = None
        self._stop_later(producer)

    def _stop_later(self, producer: JobProducer) -> None:
        task = asyncio.create_task(_stop(producer))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def close(self) -> None:
        """Stop the producer and wait for the stops still running."""
        producer, self._producer = self._producer, None
        if producer is not None:
            self._stop_later(producer)
        await asyncio.gather(*self._stopping, return_exceptions=True)


async def _stop(producer: JobProducer) -> None:
    try:
        await producer.stop()
    except Exception:
        log.debug("stopping a dropped producer failed", exc_info=True)
