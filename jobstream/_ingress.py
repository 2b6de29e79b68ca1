"""The HTTP ingress: submit jobs over HTTP, ask for their status, cancel them.

```
POST /v1/jobs/{type}[?version=N&key=K]   validate, publish, 202 {job_id, status_url, state,
     [&delay=S | &not_before=ISO]        trace_id, spooled}; a delayed job is `scheduled`
     [&priority=high|normal|low]         (a unique key's repeat: the first job, with
     [&unique_key=U&unique_for=S]        `duplicate: true`)
GET  /v1/jobs/{id}                       the job's status (pending, scheduled, running, ...)
POST /v1/jobs/{id}/cancel                ask for cancellation, 202 {job_id, state}
GET  /livez, /readyz                     probes (ready: the broker takes publishes)
GET  /openapi.json, /docs                the API, one request body schema per job type
GET  /ui                                 the on-call dashboard (`jobstream.ui`; `ui.enabled`)
```

A 202 means the broker acknowledged the job (or, with `spooled: true`, that the producer's
durable spool holds it until the broker is back). Limits come before the work they protect:
a request takes one of `max_in_flight` slots before its body is read (503 with Retry-After
when none is free), and the body is counted while it is read (413 past `max_body_bytes`,
chunked or not). An `Idempotency-Key` is bound to one job id in the status store, visible
to every replica (`consumer/stores/_keys.py`; IETF draft-ietf-httpapi-idempotency-key-header):
a repeat gets 202 once the job is published, 409 while another request publishes it, 422
when it comes with another request; after a failure the retry publishes the same job id.
Publish failures are answered in `_ingress_answers.py`. The request's span is the job's
origin context.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from opentelemetry import propagate, trace

from consumer import Settings
from consumer.core import MAX_DELAY_S
from consumer.stores import StatusStore, cancel_job
from jobstream._ingress_answers import error as _error
from jobstream._ingress_http import RequestIds
from jobstream._ingress_keys import publish_bound_s
from jobstream._ingress_publish import ProducerHandle
from jobstream._ingress_submit import Submissions, read_body
from jobstream._job_options import JobOptions, parse_job_options
from jobstream.ui import answer_store_outages, mount
from producer import BrokerUnavailable
from schemas import (
    JobRegistry,
    default_registry,
)

tracer = trace.get_tracer("jobstream.ingress")


class Ingress:
    """The endpoints' state: settings, the status store, the producer, the in-flight bound."""

    def __init__(self, settings: Settings, status: StatusStore, registry: JobRegistry) -> None:
        self.config = settings.ingress
        self.status = status
        self.registry = registry
        self.publisher = ProducerHandle(settings, registry, publish_bound_s(settings))
        self.submissions = Submissions(settings, status, registry, self.publisher)
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
                return self._too_large()
        response: Response = await call_next(request)
        return response

    async def submit(self, request: Request, job_type: str) -> Response:
        """Take a slot, read the body within its limit, validate, publish (see the module)."""
        query = request.query_params
        options = _query_options(query)
        if isinstance(options, Response):
            return options
        version, job_options = options
        idempotency_key = request.headers.get("idempotency-key")
        refused = _refused_key(idempotency_key, job_options)
        if refused is not None:
            return refused
        if self._slots.locked():  # before any byte of the body is read
            return _error(503, "too many requests in flight; retry later", self._retry_after)
        async with self._slots:
            try:
                async with asyncio.timeout(self.config.body_timeout_s):
                    body = await read_body(request, self.config.max_body_bytes)
            except TimeoutError:
                timeout_s = self.config.body_timeout_s
                return _error(408, f"the body did not arrive within {timeout_s:g}s")
            if body is None:
                return self._too_large()
            parent = propagate.extract(dict(request.headers))
            with tracer.start_as_current_span(
                f"POST /v1/jobs/{job_type}", context=parent, kind=trace.SpanKind.SERVER
            ) as span:
                span.set_attribute("http.request.method", "POST")
                span.set_attribute("jobstream.job.type", job_type)
                return await self.submissions.submit(
                    job_type,
                    version,
                    body,
                    key=query.get("key"),
                    idempotency_key=idempotency_key,
                    options=job_options,
                )

    async def close(self) -> None:
        """Wait for the bindings still being settled, then stop the producer."""
        await self.submissions.close()
        await self.publisher.close()

    def _too_large(self) -> Response:
        return _error(413, f"body over {self.config.max_body_bytes} bytes (ingress.max_body_bytes)")

    async def job_status(self, job_id: str) -> Response:
        """The job's state, attempts, timestamps and last error."""
        found = await self.status.get(job_id)
        if found is None:
            return _error(404, f"no job {job_id!r} (unknown, or expired after the retention)")
        return JSONResponse(found.model_dump(mode="json"))

    async def cancel(self, job_id: str) -> Response:
        """Cancel a job: skipped if it has not started (pending or scheduled), told to stop
        if it runs."""
        asked, current = await cancel_job(self.status, job_id)
        if not asked:
            return _error(409, f"job {job_id} is already {current.state.value}")
        return JSONResponse({"job_id": job_id, "state": current.state.value}, 202)

    async def livez(self) -> Response:
        return Response("live\n")

    async def readyz(self) -> Response:
        """200 while the broker answers (or, with a spool, while jobs can be spooled)."""
        ready, detail = await self.publisher.ready()
        return Response(f"{detail}\n", 200 if ready else 503)

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
        await connect_early(app)
        yield
        await ingress.close()

    app = FastAPI(
        title="jobstream ingress",
        version="1",
        lifespan=lifespan,
        description=(__doc__ or "").split("\n\n")[0],
    )
    app.state.ingress = ingress
    app.middleware("http")(ingress.guard)
    app.middleware("http")(RequestIds())  # outermost: its id is on the guard's answers too
    if settings.ingress.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.ingress.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-Id"],
            expose_headers=["X-Request-Id", "Retry-After"],
        )
    for job_type in registry.job_types():
        model = registry.latest(job_type)
        app.add_api_route(
            f"/v1/jobs/{job_type}",
            _route(ingress.submit, job_type),
            methods=["POST"],
            status_code=202,
            tags=["jobs"],
            summary=f"Submit a {job_type} job (v{model.job_version}; ?version=N for others)",
            openapi_extra=_submit_operation(model),
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
    if settings.ui.enabled:
        mount(app, settings, status)
    answer_store_outages(app, settings.ingress.retry_after_s)
    app.openapi = lambda: ingress.openapi(app)  # type: ignore[method-assign]
    return app


async def connect_early(app: FastAPI) -> None:
    """Connect the app's producer now if the broker answers (requests retry otherwise).
    Raises what makes this replica unable to publish at all (a `SpoolLocked` spool): the
    CLI calls it before serving, so that is one line and exit 1, not a failed lifespan."""
    with contextlib.suppress(BrokerUnavailable):
        await app.state.ingress.publisher.get()


def _query_options(query: Mapping[str, str]) -> tuple[int | None, JobOptions] | Response:
    """`?version=` and the job's options (`?delay=`, `?priority=`, `?unique_key=`, ...,
    `jobstream._job_options`), or the 400."""
    version = query.get("version")
    if version is not None and not version.isdigit():
        return _error(400, "version must be a positive integer")
    try:
        options = parse_job_options(query.get)
    except ValueError as failure:
        return _error(400, str(failure))
    return (int(version) if version else None), options


def _refused_key(idempotency_key: str | None, options: JobOptions) -> Response | None:
    """The 400 for an `Idempotency-Key` that cannot be used, else None."""
    if idempotency_key is None:
        return None
    if not idempotency_key.strip():
        # Sent but empty: a client that failed to fill its key in would get a new job
        # per retry (the IETF draft: a request with an invalid key is a 400).
        return _error(400, "the Idempotency-Key header is empty: send a non-empty key")
    if options.unique_key is not None:
        # Both name the job a retry gets; two answers to one question could disagree.
        return _error(
            400,
            "send an Idempotency-Key or ?unique_key=, not both: a unique key already "
            "answers a repeat inside its window with the first job",
        )
    return None


def _route(submit: Any, job_type: str) -> Any:
    async def endpoint(request: Request) -> Response:
        response: Response = await submit(request, job_type)
        return response

    endpoint.__name__ = f"submit_{job_type.replace('.', '_').replace('-', '_')}"
    return endpoint


def _schema_name(model: type[Any]) -> str:
    return f"{model.job_type.replace('.', '_')}_v{model.job_version}"


_MAX_DAYS = f"{MAX_DELAY_S / 86400:g} days"
_SUBMIT_PARAMETERS = [
    (
        "query",
        "version",
        {"type": "integer", "minimum": 1},
        "Schema version (default: the latest).",
    ),
    (
        "query",
        "key",
        {"type": "string", "minLength": 1},
        "Ordering key: jobs with the same key run one at a time, in order.",
    ),
    (
        "query",
        "delay",
        {"type": "number", "minimum": 0},
        f"Do not start the job before this many seconds from now (at most {_MAX_DAYS}); not "
        "with not_before. The job's state is `scheduled` until it starts.",
    ),
    (
        "query",
        "not_before",
        {"type": "string", "format": "date-time"},
        f"Do not start the job before this time: ISO 8601 with a timezone, at most {_MAX_DAYS} "
        "ahead; not with delay.",
    ),
    (
        "query",
        "priority",
        {"type": "string", "enum": ["high", "normal", "low"]},
        "Priority level (default: normal); high and low need routing.priorities.",
    ),
    (
        "query",
        "unique_key",
        {"type": "string", "minLength": 1},
        "While a job submitted with this key is inside its unique_for window, answer with "
        "that job instead of publishing (needs unique.url; not with an Idempotency-Key).",
    ),
    (
        "query",
        "unique_for",
        {"type": "number", "exclusiveMinimum": 0},
        "The unique_key's window in seconds, from the first publish.",
    ),
    (
        "header",
        "Idempotency-Key",
        {"type": "string", "minLength": 1},
        "Makes retries safe: bound to one job id and to this request (docs/http-api.md).",
    ),
]


def _submit_operation(model: type[Any]) -> dict[str, Any]:
    """The OpenAPI parameters and request body of a job type's submit route: its model,
    from the document's components. (The endpoint reads them itself, to answer each
    limit before the body is read, so FastAPI cannot derive them.)"""
    schema = {"$ref": f"#/components/schemas/{_schema_name(model)}"}
    parameters = [
        {"in": where, "name": name, "required": False, "schema": kind, "description": text}
        for where, name, kind, text in _SUBMIT_PARAMETERS
    ]
    return {
        "parameters": parameters,
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
    }


def _authorized(request: Request, token: bytes) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)


def openapi_json(settings: Settings, status: StatusStore) -> str:
    """The OpenAPI document, for `jobstream ingress --openapi` and the docs."""
    return json.dumps(create_app(settings, status).openapi(), indent=2, sort_keys=True) + "\n"
