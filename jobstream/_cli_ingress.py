"""`jobstream ingress` (the HTTP API, with the dashboard at `/ui`), `jobstream ui` (the
dashboard alone) and `jobstream jobs status|cancel ID`."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Annotated

import typer
import uvicorn

from consumer import Settings
from consumer.stores import (
    STORE_OUTAGES,
    MemoryStatusStore,
    StatusStore,
    cancel_job,
    open_status,
    store_refused,
)
from consumer.telemetry import configure, configure_logging
from jobstream._config import USAGE, fail, import_job_modules, load_settings, run
from jobstream._ingress import connect_early, create_app
from jobstream.ui import create_ui_app


def _settings(**flags: object) -> Settings:
    settings = load_settings(Settings, **flags)
    if settings.status.backend == "none":
        raise fail(
            "job status needs a shared store: set JOBSTREAM_STATUS__BACKEND=redis and "
            "JOBSTREAM_STATUS__URL=redis://host:6379/0",
            USAGE,
        )
    return settings


async def _with_status(settings: Settings) -> StatusStore:
    """The status store, connected; one line and exit 1 when it does not answer (its
    connect and first answer are bounded by 5 s each)."""
    try:
        store = await open_status(settings)
    except STORE_OUTAGES as error:
        msg = (
            f"the status store did not answer ({type(error).__name__}: {error}): check "
            "JOBSTREAM_STATUS__URL and that Redis runs"
        )
        if store_refused(error):
            msg = (
                f"the status store refused the connection ({type(error).__name__}: {error}): "
                "check status.url (its user, CA and host) and status.password_file"
            )
        raise fail(msg) from None
    assert store is not None
    return store


async def _serve(settings: Settings, *, dashboard_only: bool = False) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully and return (exit 0)."""
    service = "jobstream-ui" if dashboard_only else "jobstream-ingress"
    telemetry = configure(service)  # OTEL_* decide; off costs nothing
    status = await _with_status(settings)  # one event loop for the store and the server
    try:
        if dashboard_only:
            web = create_ui_app(settings, status)
        else:
            web = create_app(settings, status)
            await connect_early(web)  # a spool owned by another process: one line, exit 1
        config = uvicorn.Config(
            web,
            host=settings.ingress.host,
            port=settings.ingress.port,
            log_level="warning",
            access_log=False,
        )
        # uvicorn handles SIGTERM/SIGINT while it serves, restores the handlers it found,
        # then re-raises the signal; no-op handlers installed just before make that
        # re-raise harmless, so a graceful stop exits 0 (a signal before this still kills).
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: None)
        await uvicorn.Server(config).serve()
    finally:
        await status.close()
        await asyncio.to_thread(telemetry.shutdown)  # exports the spans still queued


def register(app: typer.Typer) -> None:
    @app.command("ingress")
    def ingress(
        host: Annotated[
            str | None, typer.Option(help="Bind address \\[env: JOBSTREAM_INGRESS__HOST].")
        ] = None,
        port: Annotated[
            int | None, typer.Option(help="Port \\[env: JOBSTREAM_INGRESS__PORT].")
        ] = None,
        openapi: Annotated[
            bool, typer.Option("--openapi", help="Print the OpenAPI document and exit.")
        ] = False,
    ) -> None:
        """Serve the HTTP API: submit jobs, query their status, cancel them; and the
        on-call dashboard at /ui (ui.enabled)."""
        settings = _settings(**{"ingress.host": host, "ingress.port": port})
        import_job_modules(settings)
        if openapi:
            document = create_app(settings, MemoryStatusStore()).openapi()
            typer.echo(json.dumps(document, indent=2, sort_keys=True))
            return
        configure_logging(settings.logging)
        run(lambda: _serve(settings))

    @app.command("ui")
    def ui(
        host: Annotated[
            str | None, typer.Option(help="Bind address \\[env: JOBSTREAM_INGRESS__HOST].")
        ] = None,
        port: Annotated[
            int | None, typer.Option(help="Port \\[env: JOBSTREAM_INGRESS__PORT].")
        ] = None,
    ) -> None:
        """Serve the on-call dashboard alone at /ui (jobs, dead letters, live view), without
        the job API. It signs in with ingress.auth_token; ui.read_only turns actions off."""
        settings = _settings(**{"ingress.host": host, "ingress.port": port})
        import_job_modules(settings)
        configure_logging(settings.logging)
        run(lambda: _serve(settings, dashboard_only=True))

    jobs = typer.Typer(help="One job: its status, or cancel it.")
    app.add_typer(jobs, name="jobs")

    @jobs.command("status")
    def status(job_id: Annotated[str, typer.Argument(help="The job id.")]) -> None:
        """Print the job's state, attempts, timestamps and last error as JSON."""
        settings = _settings()

        async def body() -> str | None:
            store = await _with_status(settings)
            try:
                found = await store.get(job_id)
            finally:
                await store.close()
            return found.model_dump_json() if found else None

        found = run(body)
        if found is None:
            raise fail(
                f"no job {job_id!r} (unknown, or expired after JOBSTREAM_STATUS__RETENTION_S)"
            )
        typer.echo(found)

    @jobs.command("cancel")
    def cancel(job_id: Annotated[str, typer.Argument(help="The job id.")]) -> None:
        """Cancel a job: skipped if it has not started (pending or scheduled), told to stop
        if it runs."""
        settings = _settings()

        async def body() -> str:
            store = await _with_status(settings)
            try:
                asked, current = await cancel_job(store, job_id)
                return current.state.value if asked else f"already {current.state.value}"
            finally:
                await store.close()

        state = run(body)
        if state.startswith("already"):
            raise fail(f"job {job_id} is {state}: nothing to cancel")
        typer.echo(json.dumps({"job_id": job_id, "state": state}))
