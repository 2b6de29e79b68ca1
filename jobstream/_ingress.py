"""The HTTP ingress: submit jobs over HTTP, ask for their status, cancel them.

```
POST /v1/jobs/{type}[?version=N&key=K]   validate, publish, 202 {job_id, status_url, trace_id}
GET  /v1/jobs/{id}                       the job's status (pending, running, succeeded, ...)
POST /v1/jobs/{id}/cancel                ask for cancellation, 202 {job_id, state}
GET  /livez, /readyz                     probes (ready: the broker takes publishes)
GET  /openapi.json, /docs                the API, one request body schema per job type
```

Answers: 400 with field-level errors for an invalid payload (the same strict validation the
worker applies), 404 for an unknown type or job, 413 over `max_body_bytes`, 401 without the
configured bearer token, 503 with Retry-After when the broker is unavailable or
`max_in_flight` requests are already publishing (no unbounded queue). An `Idempotency-Key`
header binds the request to one job id: a retried request gets the same id back and
publishes nothing. The request's span is the job's origin context.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from opentelemetry import propagate, trace

from consumer import Settings
from consumer.stores import FINAL_STATES, JobState, StatusStore, trace_id_now
from producer import BrokerUnavailable, JobProducer, PublishTimeout
from schemas import (
    InvalidPayload,
    JobDecodeError,
    JobRegistry,
    UnknownJobType,
    UnsupportedVersion,
    default_registry,
    validate_payload,
)

tracer = trace.get_tracer("jobstream.ingress")


def _error(
    status: int, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


class _Publisher:
    """The producer, connected on first use and reconnected after an outage, so the ingress
    starts (and answers 503) while the broker is down."""

    def __init__(self, settings: Settings, registry: JobRegistry) -> None:
        self._settings = settings
        self._registry = registry
        self._producer: JobProducer | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> JobProducer:
        async with self._lock:
            if self._producer is None:
                producer = JobProducer(self._settings, registry=self._registry)
                await producer.start()
                self._producer = producer
            return self._producer

    async def reset(self) -> None:
        async with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()

    @property
    def connected(self) -> bool:
        return self._producer is not None


class Ingress:
    """The endpoints' state: settings, the status store, the producer, the in-flight bound."""

    def __init__(self, settings: Settings, status: StatusStore, registry: JobRegistry) -> None:
        self.config = settings.ingress
        self.status = status
        self.registry = registry
        self.publisher = _Publisher(settings, registry)
        self._slots = asyncio.Semaphore(self.config.max_in_flight)
        self._retry_after = {"Retry-After": str(self.config.retry_after_s)}
        token = self.config.auth_token
        self._token = token.get_secret_value().encode() if token else None

    async def guard(self, request: Request, call_next: Any) -> Response:
        """Auth and the declared body size, before any body is read."""
        if request.url.path.startswith("/v1/"):
            if self._token is not None and not _authorized(request, self._token):
                return _error(
                    401, "missing or wrong bearer token: send `Authorization: Bearer <token>`"
                )
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.config.max_body_bytes:
                return _error(413, f"body over {self.config.max_body_bytes} bytes")
        response: Response = await call_next(request)
        return response

    async def submit(self, request: Request, job_type: str) -> Response:
        body = await request.body()
        if len(body) > self.config.max_body_bytes:
            return _error(413, f"body over {self.config.max_body_bytes} bytes")
        version = request.query_params.get("version")
        if version is not None and not version.isdigit():
            return _error(400, "version must be a positive integer")
        if self._slots.locked():
            return _error(503, "too many requests in flight; retry later", self._retry_after)
        async with self._slots:
            parent = propagate.extract(dict(request.headers))
            with tracer.start_as_current_span(
                f"POST /v1/jobs/{job_type}", context=parent, kind=trace.SpanKind.SERVER
            ) as span:
                span.set_attribute("http.request.method", "POST")
                span.set_attribute("jobstream.job.type", job_type)
                return await self._publish(
                    request, job_type, int(version) if version else None, body
                )

    async def _publish(
        self, request: Request, job_type: str, version: int | None, body: bytes
    ) -> Response:
        try:
            model = (
                self.registry.latest(job_type)
                if version is None
                else self.registry.resolve(job_type, version)
            )
            job = validate_payload(model, body)
        except (UnknownJobType, UnsupportedVersion) as error:
            return _error(404, str(error), known_types=self.registry.job_types())
        except InvalidPayload as error:
            fields = [
                {"field": ".".join(map(str, e.get("loc", ()))), "message": e.get("msg")}
                for e in error.errors
            ]
            return _error(400, "invalid payload", fields=fields)
        except JobDecodeError as error:
            return _error(400, str(error))
        job_id = str(uuid.uuid4())
        key = request.headers.get("idempotency-key")
        if key:
            bound = await self.status.remember_key(f"{job_type}:{key}", job_id)
            if bound != job_id:
                return _accepted(bound, await self.status.get(bound))
        try:
            producer = await self.publisher.get()
            await producer.publish(job, key=request.query_params.get("key"), id=job_id)
        except (BrokerUnavailable, PublishTimeout) as error:
            if key:
                await self.status.forget_key(f"{job_type}:{key}")
            await self.publisher.reset()
            return _error(503, f"broker unavailable: {error}", self._retry_after)
        recorded = await self.status.record(
            job_id,
            JobState.PENDING,
            job_type=job_type,
            created_at=datetime.now(UTC),
            trace_id=trace_id_now(),
        )
        return _accepted(job_id, recorded)

    async def job_status(self, job_id: str) -> Response:
        """The job's state, attempts, timestamps and last error."""
        found = await self.status.get(job_id)
        if found is None:
            return _error(404, f"no job {job_id!r} (unknown, or expired after the retention)")
        return JSONResponse(found.model_dump(mode="json"))

    async def cancel(self, job_id: str) -> Response:
        """Cancel a job: skipped if it has not started, told to stop if it runs."""
        current = await self.status.get(job_id)
        if current is not None and current.state in FINAL_STATES:
            return _error(409, f"job {job_id} is already {current.state.value}")
        await self.status.request_cancel(job_id)
        if current is None or current.state is JobState.PENDING:
            current = await self.status.record(job_id, JobState.CANCELLED)
        return JSONResponse({"job_id": job_id, "state": current.state.value}, 202)

    async def livez(self) -> Response:
        return Response("live\n")

    async def readyz(self) -> Response:
        try:
            await self.publisher.get()
        except BrokerUnavailable:
            return Response("not ready: broker unavailable\n", 503)
        return Response("ready\n")

    def openapi(self, app: FastAPI) -> dict[str, Any]:
        """FastAPI's document, with each job type's model as its request body schema."""
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = document.setdefault("components", {}).setdefault("schemas", {})
            for model in self.registry:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(schema.pop("$defs", {}))
                components[_schema_name(model)] = schema
            app.openapi_schema = document
        return app.openapi_schema


def create_app(
    settings: Settings, status: StatusStore, *, registry: JobRegistry = default_registry
) -> FastAPI:
    """The ingress app. `status` is shared with the workers (see `consumer.stores._status`)."""
    ingress = Ingress(settings, status, registry)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        with contextlib.suppress(BrokerUnavailable):
            await ingress.publisher.get()  # connect early when we can; requests retry otherwise
        yield
        await ingress.publisher.reset()

    app = FastAPI(
        title="jobstream ingress",
        version="1",
        lifespan=lifespan,
        description=(__doc__ or "").split("\n\n")[0],
    )
    app.middleware("http")(ingress.guard)
    for job_type in registry.job_types():
        model = registry.latest(job_type)
        app.add_api_route(
            f"/v1/jobs/{job_type}",
            _route(ingress.submit, job_type),
            methods=["POST"],
            status_code=202,
            tags=["jobs"],
            summary=f"Submit a {job_type} job (v{model.job_version}; ?version=N for others)",
            openapi_extra=_request_body(model),
        )
    # Any other type: answered by `submit` too, with 404 and the list of known types.
    app.add_api_route(
        "/v1/jobs/{job_type}", ingress.submit, methods=["POST"], include_in_schema=False
    )
    app.add_api_route("/v1/jobs/{job_id}", ingress.job_status, methods=["GET"], tags=["status"])
    app.add_api_route(
        "/v1/jobs/{job_id}/cancel",
        ingress.cancel,
        methods=["POST"],
        status_code=202,
        tags=["status"],
    )
    app.add_api_route("/livez", ingress.livez, include_in_schema=False)
    app.add_api_route("/readyz", ingress.readyz, include_in_schema=False)
    app.openapi = lambda: ingress.openapi(app)  # type: ignore[method-assign]
    return app


def _route(submit: Any, job_type: str) -> Any:
    async def endpoint(request: Request) -> Response:
        response: Response = await submit(request, job_type)
        return response

    endpoint.__name__ = f"submit_{job_type.replace('.', '_').replace('-', '_')}"
    return endpoint


def _schema_name(model: type[Any]) -> str:
    return f"{model.job_type.replace('.', '_')}_v{model.job_version}"


def _request_body(model: type[Any]) -> dict[str, Any]:
    """The OpenAPI request body of a job type: its model, from the document's components."""
    schema = {"$ref": f"#/components/schemas/{_schema_name(model)}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _accepted(job_id: str, recorded: Any) -> JSONResponse:
    body = {
        "job_id": job_id,
        "status_url": f"/v1/jobs/{job_id}",
        "state": recorded.state.value if recorded else JobState.PENDING.value,
        "trace_id": recorded.trace_id if recorded else None,
    }
    return JSONResponse(body, 202, headers={"Location": f"/v1/jobs/{job_id}"})


def _authorized(request: Request, token: bytes) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)


def openapi_json(settings: Settings, status: StatusStore) -> str:
    """The OpenAPI document, for `jobstream ingress --openapi` and the docs."""
    return json.dumps(create_app(settings, status).openapi(), indent=2, sort_keys=True) + "\n"
