"""The stream and the durable consumers a NATS source pulls from, as the server has them.

`DurableConsumers` owns what the source checks and repairs on the server:

- At start, the stream must exist (created from the settings if `create_missing`) and be
  split into as many key partitions as `jetstream.key_partitions` says (`WorkerError`
  otherwise: workers and stream must agree), and the group's consumers are ensured.
- A durable consumer deleted on the server (pulls answered `409 Consumer Deleted`, then
  `503`, or a `probe` finds it missing) is marked lost (`mark_lost`) and re-created by
  `restore`, at most once a second, from the same plan as at start; it delivers the
  stream again from its start (the idempotency store skips what was done). If JetStream
  refuses it, `restore` raises `WorkerError` (exit 1).
- `probe` and `backlog` read the consumers' info: whether JetStream answers (health), and
  how many messages wait per consumer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from consumer.core import Settings, WorkerError
from consumer.nats._held import Puller
from consumer.nats._provision import ensure_consumers, ensure_key_partitions, stream_destinations
from consumer.telemetry import Backlog
from producer.nats import KEY_PARTITIONS_METADATA, ensure_nats_stream

log = logging.getLogger("jobstream.nats")

_RESTORE_BACKOFF_S = 1.0  # between two attempts to re-create the lost consumers
_CONSUMER_NOT_FOUND = 10014  # JetStream's error code; a missing stream is another


class DurableConsumers:
    """The stream and the consumers of `pullers`, checked at start and re-created if lost."""

    def __init__(
        self,
        settings: Settings,
        subjects: Sequence[str],
        pullers: Sequence[Puller],
        on_lost: Callable[[], None],
    ) -> None:
        self._settings = settings
        self._subjects = subjects
        self._pullers = pullers
        self._on_lost = on_lost  # called when a probe finds a consumer missing
        self._lost: set[Puller] = set()  # consumers found deleted, re-created by `restore`
        self._restore_not_before = 0.0

    @property
    def any_lost(self) -> bool:
        return bool(self._lost)

    def mark_lost(self, puller: Puller) -> None:
        self._lost.add(puller)

    async def prepare(self, js: JetStreamContext) -> None:
        """Check (or create) the stream and ensure the group's consumers."""
        await self._check_stream(js)
        await ensure_consumers(js, self._settings, self._subjects)

    async def probe(self, js: JetStreamContext) -> bool:
        """Ask JetStream for the info of every consumer; True if all answered. A consumer
        missing is marked lost (and `on_lost` called)."""
        for puller in self._pullers:
            try:
                await js.consumer_info(self._settings.routing.stream, puller.consumer)
            except NotFoundError as error:
                if error.err_code == _CONSUMER_NOT_FOUND:
                    self._lost.add(puller)
                    self._on_lost()
                return False
        return True

    async def backlog(self, js: JetStreamContext) -> list[Backlog]:
        """Per consumer: messages not delivered yet plus delivered and not acknowledged (a
        consumer that does not answer is left out)."""
        found: list[Backlog] = []
        for puller in self._pullers:
            try:
                info = await js.consumer_info(self._settings.routing.stream, puller.consumer)
            except nats.errors.Error:
                continue
            waiting = (info.num_pending or 0) + (info.num_ack_pending or 0)
            found.append(Backlog(self._settings.routing.stream, puller.consumer, waiting))
        return found

    async def restore(self, client: NatsClient) -> None:
        """Re-create the consumers found deleted, from the plan used at start (`WorkerError`
        if JetStream refuses); at most once a `_RESTORE_BACKOFF_S`."""
        now = time.monotonic()
        if now < self._restore_not_before:
            return
        self._restore_not_before = now + _RESTORE_BACKOFF_S
        js = client.jetstream(timeout=self._settings.nats.publish_timeout_s)
        missing: list[str] = []
        try:
            for puller in list(self._lost):
                try:
                    await js.consumer_info(self._settings.routing.stream, puller.consumer)
                except NotFoundError as error:
                    if error.err_code != _CONSUMER_NOT_FOUND:
                        raise  # the stream is not there (yet): retried
                    missing.append(puller.consumer)
                else:
                    self._lost.discard(puller)  # a 503 while JetStream was away: it is there
            if missing:
                log.warning(
                    "JetStream consumer %s of stream %s is gone (deleted on the server): "
                    "re-creating it; it delivers the stream again from its start and the "
                    "idempotency store skips the jobs already done",
                    ", ".join(missing),
                    self._settings.routing.stream,
                )
                await ensure_consumers(js, self._settings, self._subjects)
        except nats.errors.Error as error:  # no answer: JetStream is not back yet
            log.debug("checking the consumers failed, will retry: %r", error)
            return
        for puller in self._lost:
            puller.requests.clear()  # asked of the deleted consumer: never answered
        self._lost.clear()

    async def _check_stream(self, js: JetStreamContext) -> None:
        settings = self._settings
        stream, wanted = settings.routing.stream, settings.jetstream.key_partitions
        try:
            info = await js.stream_info(stream)
        except NotFoundError:
            if not settings.create_missing:
                msg = (
                    f"stream {stream!r} does not exist: "
                    "run `jobstream topics ensure --transport nats`"
                )
                raise WorkerError(msg) from None
            destinations = stream_destinations(settings, self._subjects)
            await ensure_nats_stream(js, destinations, settings.routing)
            await ensure_key_partitions(js, settings)
            return
        found = int((info.config.metadata or {}).get(KEY_PARTITIONS_METADATA, "0"))
        if found != wanted:
            msg = (
                f"stream {stream!r} is partitioned into {found} key partitions but "
                f"JOBSTREAM_JETSTREAM__KEY_PARTITIONS={wanted}: set the same number everywhere "
                "and run `jobstream topics ensure --transport nats`"
            )
            raise WorkerError(msg)
        if not info.config.allow_msg_schedules:
            log.warning(
                "stream %r does not allow message schedules: delayed jobs are handed back "
                "with nak(delay) instead, spending a delivery; run `jobstream topics ensure "
                "--transport nats` (nats-server 2.12 or later)",
                stream,
            )
