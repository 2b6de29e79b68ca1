"""Mount the dashboard on the ingress, or build an app that serves only the dashboard."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from consumer import Settings
from consumer.stores import STORE_OUTAGES, StatusStore
from jobstream._ingress_http import RequestIds
from jobstream.ui._pages import Dashboard
from producer import PublishError

__all__ = ["answer_store_outages", "create_ui_app", "mount"]

log = logging.getLogger("jobstream.ingress")


def mount(app: FastAPI, settings: Settings, status: StatusStore) -> None:
    """Add the `/ui` routes to `app` (they are not part of the API's OpenAPI document)."""
    app.include_router(Dashboard(settings, status).router())


def answer_store_outages(app: FastAPI, retry_after_s: int) -> None:
    """A status store that cannot be reached, or does not answer in time, makes any route
    of `app` answer 503 with `Retry-After`: JSON for the API, a line of text for the
    dashboard; so does a broker that fails a dashboard page (`PublishError`: down, or
    refusing us). Never a bare 500 (docs/http-api.md)."""
    headers = {"Retry-After": str(retry_after_s)}

    async def unavailable(request: Request, error: Exception) -> Response:
        log.warning(
            "the status store did not answer %s %s: %r", request.method, request.url.path, error
        )
        message = "the status store is unavailable"
        if request.url.path.startswith("/ui"):
            text = f"{message}: try again in a few seconds\n"
            return PlainTextResponse(text, 503, headers=headers)
        return JSONResponse({"error": message}, 503, headers=headers)

    for outage in STORE_OUTAGES:
        app.add_exception_handler(outage, unavailable)

    async def broker_failed(request: Request, error: Exception) -> Response:
        # The dead-letter pages read and replay through the broker: a broker that is down
        # or refuses us (docs/security.md) is one line on the page, not a bare 500.
        if not request.url.path.startswith("/ui"):
            raise error  # the API answers its own publish errors (jobstream._ingress_answers)
        log.warning("the broker failed %s %s: %s", request.method, request.url.path, error)
        text = f"the broker is unavailable: {' '.join(str(error).split())}\n"
        return PlainTextResponse(text, 503, headers=headers)

    app.add_exception_handler(PublishError, broker_failed)


def create_ui_app(settings: Settings, status: StatusStore) -> FastAPI:
    """An app serving the dashboard alone (`jobstream ui`), plus `/livez`."""
    app = FastAPI(title="jobstream dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    mount(app, settings, status)
    answer_store_outages(app, settings.ingress.retry_after_s)
    app.middleware("http")(RequestIds())  # request ids and the HTML security headers

    async def livez() -> Response:
        return Response("live\n")

    app.add_api_route("/livez", livez, include_in_schema=False)
    return app
