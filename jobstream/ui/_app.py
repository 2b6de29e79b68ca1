"""Mount the dashboard on the ingress, or build an app that serves only the dashboard."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import Response

from consumer import Settings
from consumer.stores import StatusStore
from jobstream.ui._pages import Dashboard

__all__ = ["create_ui_app", "mount"]


def mount(app: FastAPI, settings: Settings, status: StatusStore) -> None:
    """Add the `/ui` routes to `app` (they are not part of the API's OpenAPI document)."""
    app.include_router(Dashboard(settings, status).router())


def create_ui_app(settings: Settings, status: StatusStore) -> FastAPI:
    """An app serving the dashboard alone (`jobstream ui`), plus `/livez`."""
    app = FastAPI(title="jobstream dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    mount(app, settings, status)

    async def livez() -> Response:
        return Response("live\n")

    app.add_api_route("/livez", livez, include_in_schema=False)
    return app
