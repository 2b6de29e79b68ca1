"""Mount the dashboard on the ingress, or build an app that serves only the dashboard."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from consumer import Settings
from consumer.stores import STORE_OUTAGES, StatusStore
from jobstream.ui._pages import Dashboard

__all__ = ["answer_store_outages", "create_ui_app", "mount"]

log = logging.getLogger("jobstream.ingress")


def mount(app: FastAPI, settings: Settings, status: StatusStore) -> None:
    """Add the `/ui` routes to `app` (they are not part of the API's OpenAPI document)."""
    app.include_router(Dashboard(settings, status).router())


def answer_store_outages(app: FastAPI, retry_after_s: int) -> None:
    """A status store that cannot be reached, or does not answer in time, makes any route
    of `app` answer 503 with `Retry-After`: JSON for the API, a line of text for the
    dashboard. Never a bare 500 (docs/http-api.md)."""
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


def create_ui_app(settings: Settings, status: StatusStore) -> FastAPI:
    """An app serving the dashboard alone (`jobstream ui`), plus `/livez`."""
    app = FastAPI(title="jobstream dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    mount(app, settings, status)
    answer_store_outages(app, settings.ingress.retry_after_s)

    async def livez() -> Response:
        return Response("live\n")

    app.add_api_route("/livez", livez, include_in_schema=False)
    return app
