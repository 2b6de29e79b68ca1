"""`jobstream worker MODULE:APP`: run a worker for an app's handlers.

When the worker stopped with abandoned runs still going (a handler that ignored its
cancellation, a thread blocked in a handler; see `Worker.abandoned`), the process exits 0
with `os._exit` once the worker has committed, left its group and flushed its telemetry
and logs: neither `asyncio.run`'s final cancellation of the remaining tasks nor the
interpreter's join of the pool threads would ever return. See docs/worker.md#shutdown.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
from typing import Annotated

import typer

from consumer import App, Settings, WorkerError, run_worker
from consumer.telemetry import configure_logging, flush_logs
from jobstream._config import fail, load_settings, quiet_tls_eof_notice, refused
from schemas import JobstreamError


def load_app(target: str) -> App:
    """Import `module:attribute` and check that it is an `App`."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise fail(f"{target!r} is not MODULE:APP (for example `myservice.jobs:app`)", 2)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise fail(f"cannot import {module_name!r}: {error}; is it on PYTHONPATH?", 2) from None
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        raise fail(f"{target!r} is not a jobstream App (found {type(app).__name__})", 2)
    return app


def register(cli: typer.Typer) -> None:
    @cli.command("worker")
    def worker(
        target: Annotated[str, typer.Argument(help="The app to run, as MODULE:APP.")],
        group: Annotated[
            str | None, typer.Option(help="Consumer group \\[env: JOBSTREAM_WORKER__GROUP].")
        ] = None,
        transport: Annotated[
            str | None, typer.Option(help="kafka or nats \\[env: JOBSTREAM_TRANSPORT].")
        ] = None,
        max_in_flight: Annotated[
            int | None,
            typer.Option(help="Bound on jobs in flight \\[env: JOBSTREAM_WORKER__MAX_IN_FLIGHT]."),
        ] = None,
        ordering: Annotated[
            str | None,
            typer.Option(help="key, partition or none \\[env: JOBSTREAM_WORKER__ORDERING]."),
        ] = None,
        health_port: Annotated[
            int | None,
            typer.Option(
                help="Port of /livez and /readyz, 0 = off \\[env: JOBSTREAM_HEALTH__PORT]."
            ),
        ] = None,
    ) -> None:
        """Consume jobs for the handlers of MODULE:APP until SIGTERM, then drain and exit 0."""
        settings = load_settings(
            Settings,
            **{
                "worker.group": group,
                "transport": transport,
                "worker.max_in_flight": max_in_flight,
                "worker.ordering": ordering,
                "health.port": health_port,
            },
        )
        app = load_app(target)
        configure_logging(settings.logging)
        quiet_tls_eof_notice()
        try:
            asyncio.run(_work(app, settings))
        except WorkerError as error:
            flush_logs()  # the jobs' buffered lines before the `error:` line
            raise fail(str(error)) from None
        except (JobstreamError, NotImplementedError, OSError) as error:
            flush_logs()
            raise fail(f"{error}") from None
        except ValueError as error:
            flush_logs()
            raise refused(error) from None
        sys.stdout.flush()


async def _work(app: App, settings: Settings) -> None:
    worker = await run_worker(app, settings)
    if worker.abandoned:
        # Everything settled is committed and the group left; what still runs is not ours.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
