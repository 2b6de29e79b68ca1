"""The `jobstream` command line.

Each command group lives in its own module (`_cli_<group>.py`) and is registered here.
Errors a user can fix are printed as one line on stderr, with exit code 2 (usage) or 1.
"""

from __future__ import annotations

import typer

from jobstream import (
    _cli_dlq,
    _cli_ingress,
    _cli_outbox,
    _cli_publish,
    _cli_schemas,
    _cli_spool,
    _cli_topics,
    _cli_worker,
)

app = typer.Typer(
    name="jobstream",
    help="Typed, idempotent jobs on Kafka and NATS JetStream: publish, run workers, "
    "inspect and replay dead letters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_cli_schemas.register(app)
_cli_publish.register(app)
_cli_topics.register(app)
_cli_worker.register(app)
_cli_dlq.register(app)
_cli_ingress.register(app)
_cli_spool.register(app)
_cli_outbox.register(app)


def main() -> None:
    app()
