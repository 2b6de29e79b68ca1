"""`jobstream schemas ...`: export the JSON Schemas of the registered job types."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    schemas = typer.Typer(help="Job type schemas (JSON Schema export for non-Python producers).")
    app.add_typer(schemas, name="schemas")

    @schemas.command("list")
    def list_types() -> None:
        """List the registered job types and versions."""
