"""`POST /v1/jobs/{type}` after its slot was taken and its body read: validate, check the
attributes, reserve the `Idempotency-Key`, publish, settle the binding, record `pending`
(`scheduled`, with its `not_before`, for a job due later: `?delay=`, `?not_before=`).

Order, and why: the binding is reserved only once the request could be published (valid
payload, attributes within the wire limit), so a request refused with 4xx never binds a
key. It is settled in `finally`, in a task of its own, so no error and no cancellation (the
client went away) leaves it `reserved` beyond its lease. `pending` is written after the
publish, never before: a job id the broker never took must not look submitted; a worker
that already wrote `running` (or a final state) keeps it (`consumer/stores/_status.py`
`_merge`). The ingress's `scheduled` is what a waiting job shows at once (a worker writes
it too, later, when it sets the job aside: `consumer/runtime/_scheduled.py`). A
`?unique_key=` whose window holds an earlier job is answered with that job (`duplicate:
true`); nothing is published or recorded for the repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import UTC, datetime

from fastapi import Request
from fastapi.responses import Response

from consumer import Settings
from consumer.stores import (
    JobState,
    JobStatus,
    KeyBinding,
    KeyState,
    StatusStore,
    trace_id_now,
)
from jobstream._ingress_answers import accepted, error, publish_failure
from jobstream._ingress_keys import binding_name, check_attributes, fingerprint, lease_s
from jobstream._ingress_publish import ProducerHandle
from jobstream._job_options import JobOptions
from producer import PublishError
from schemas import (
    InvalidAttributes,
    InvalidPayload,
    Job,
    JobDecodeError,
    JobRegistry,
    UnknownJobType,
    UnsupportedVersion,
    validate_payload,
)

__all__ = ["Submissions", "read_body"]

log = logging.getLogger("jobstream.ingress")
_DEFAULTS = JobOptions()


class Submissions:
    """Turns a read request body into a published job and its answer."""

    def __init__(
        self,
        settings: Settings,
        status: StatusStore,
        registry: JobRegistry,
        publisher: ProducerHandle,
    ) -> None:
        self.status = status
        self.registry = registry
        self.publisher = publisher
        self._source = settings.source
        self._lease_s = lease_s(settings)
        self._retry_after_s = settings.ingress.retry_after_s
        self._retry_after = {"Retry-After": str(self._retry_after_s)}
        self._settling: set[asyncio.Task[None]] = set()

    async def submit(
        self,
        job_type: str,
        version: int | None,
        body: bytes,
        *,
        key: str | None,
        idempotency_key: str | None,
        options: JobOptions = _DEFAULTS,
    ) -> Response:
        """The answer to one submission (docs/http-api.md lists them). `options`: the
        parsed `?delay=`, `?priority=`, `?unique_key=`, ... ."""
        job = self._validate(job_type, version, body)
        if isinstance(job, Response):
            return job
        job_id = str(uuid.uuid4())
        schedule = options.schedule
        not_before = schedule.not_before if schedule is not None else None
        try:
            check_attributes(
                job, key=key, job_id=job_id, source=self._source, not_before=not_before
            )
        except InvalidAttributes as failure:
            return error(400, f"the job's attributes cannot be published: {failure}")
        if idempotency_key is None:
            return await self._publish(job, key, job_id, None, options)
        name = binding_name(job_type, idempotency_key)
        request_print = fingerprint(job_type, job.job_version, key, body, options.canonical)
        try:
            reservation = await self.status.reserve_key(name, job_id, request_print, self._lease_s)
        except Exception:
            log.exception("the status store did not answer a reservation")
            return error(503, "the status store is unavailable", self._retry_after)
        binding = reservation.binding
        if not reservation.held:
            return await self._repeat(binding, request_print)
        return await self._publish(job, key, binding.job_id, (name, binding.holder), options)

    def _validate(self, job_type: str, version: int | None, body: bytes) -> Job | Response:
        try:
            model = (
                self.registry.latest(job_type)
                if version is None
                else self.registry.resolve(job_type, version)
            )
            return validate_payload(model, body)
        except (UnknownJobType, UnsupportedVersion) as failure:
            return error(404, str(failure), known_types=self.registry.job_types())
        except InvalidPayload as failure:
            fields = [
                {"field": ".".join(map(str, e.get("loc", ()))), "message": e.get("msg")}
                for e in failure.errors
            ]
            return error(400, "invalid payload", fields=fields)
        except JobDecodeError as failure:
            return error(400, str(failure))

    async def _repeat(self, binding: KeyBinding, request_print: str) -> Response:
        """A request whose key another request holds: 422, 202 or 409 (the IETF draft)."""
        if binding.fingerprint != request_print:
            return error(
                422,
                "this Idempotency-Key was used with a different request (job type, version, "
                "?key=, ?delay=, ?not_before=, ?priority= or body); use a new key for a new "
                "request",
            )
        if binding.state is KeyState.PUBLISHED:
            recorded = await self.status.get(binding.job_id)
            return accepted(binding.job_id, recorded, spooled=binding.spooled)
        return error(
            409,
            "a request with this Idempotency-Key is being published now; retry later",
            self._retry_after,
        )

    async def _publish(
        self,
        job: Job,
        key: str | None,
        job_id: str,
        hold: tuple[str, str] | None,
        options: JobOptions,
    ) -> Response:
        """Publish `job_id`; with `hold` (binding name, holder), settle the binding whatever
        happens: `published`, or `failed` on any error or cancellation (keeping the id)."""
        state, spooled = KeyState.FAILED, False
        try:
            try:
                receipt = await self.publisher.send(job, key=key, job_id=job_id, options=options)
            except (PublishError, InvalidAttributes) as failure:
                retry_after_s = self._retry_after_s
                return publish_failure(
                    failure, job_id, keyed=hold is not None, retry_after_s=retry_after_s
                )
            except ValueError as failure:  # a setting the option needs is off
                return error(400, str(failure))
            state, spooled = KeyState.PUBLISHED, receipt.spooled
        finally:
            if hold is not None:
                await self._settle(*hold, state, spooled=spooled)
        if receipt.duplicate:  # a unique key's earlier job, recorded when it was published
            recorded = await self._status_of(receipt.job_id)
            return accepted(receipt.job_id, recorded, spooled=receipt.spooled, duplicate=True)
        job_id = receipt.job_id  # a unique key taken over keeps the job id it was bound to
        schedule = options.schedule
        not_before = schedule.not_before if schedule is not None else None
        now = datetime.now(UTC)
        waiting = (
            JobState.SCHEDULED if not_before is not None and not_before > now else JobState.PENDING
        )
        try:
            recorded = await self.status.record(
                job_id,
                waiting,
                job_type=job.job_type,
                created_at=now,
                trace_id=trace_id_now(),
                not_before=not_before,
                key=key,
            )
        except Exception:  # status is an observation: the job is published all the same
            log.warning("could not record job %s as %s", job_id, waiting.value, exc_info=True)
            recorded = None
        return accepted(job_id, recorded, spooled=spooled, trace_id=trace_id_now(), state=waiting)

    async def _status_of(self, job_id: str) -> JobStatus | None:
        try:
            return await self.status.get(job_id)
        except Exception:  # status is an observation: the answer names the job all the same
            log.warning("could not read the status of job %s", job_id, exc_info=True)
            return None

    async def _settle(self, name: str, holder: str, state: KeyState, *, spooled: bool) -> None:
        """Settle the binding in a task of its own: a cancelled request (client gone) still
        settles it. A store error is logged: the reservation then ends with its lease."""
        task = asyncio.ensure_future(self.status.settle_key(name, holder, state, spooled=spooled))
        self._settling.add(task)
        task.add_done_callback(self._settled)
        with contextlib.suppress(Exception):
            await asyncio.shield(task)

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._settling.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning(
                "could not settle an Idempotency-Key binding; it counts as failed when its "
                "lease ends",
                exc_info=task.exception(),
            )

    async def close(self) -> None:
        """Wait for the bindings still being settled."""
        await asyncio.gather(*self._settling, return_exceptions=True)


async def read_body(request: Request, limit: int) -> bytes | None:
    """The body, read chunk by chunk; None as soon as it passes `limit` bytes (the rest is
    never read: a chunked upload without Content-Length costs at most one chunk more)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
