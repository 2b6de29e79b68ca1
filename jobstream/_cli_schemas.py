"""`jobstream schemas ...`: list job types and export their JSON Schemas.

Also home of the helpers the producer-side commands share (settings, job modules, running
an async body), because this is the lowest command module: the others import it.

Exit codes: 0 success, 1 a run-time failure (broker, stale files), 2 a usage error (a bad
flag, payload or setting). Every error is one line on stderr: `error: <what> ...<fix>`.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import re
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic_settings import SettingsError

from jobstream._config import fail, load_settings
from producer import ProducerSettings
from schemas import JobstreamError, default_registry, export_json_schemas

T = TypeVar("T")
USAGE = 2
RUNTIME = 1
DEFAULT_SCHEMA_DIR = Path("schemas/jsonschema")


def settings_for(**flags: Any) -> ProducerSettings:
    """Producer settings: `flags` (None: not given) over environment over config file."""
    try:
        return load_settings(ProducerSettings, **flags)
    except SettingsError as error:  # an env value that is not valid JSON for a list/object
        field = re.search(r'field "(\w+)"', str(error))
        where = f"JOBSTREAM_{field.group(1).upper()}*" if field else "a JOBSTREAM_* variable"
        raise fail(
            f"invalid setting in {where}: {error} (values of lists and objects are JSON, e.g. "
            "JOBSTREAM_NATS__SERVERS='[\"nats://a:4222\"]'; see docs/configuration.md)",
            USAGE,
        ) from None


def import_job_modules(settings: ProducerSettings) -> None:
    """Import `settings.job_modules`, which registers their job types."""
    for name in settings.job_modules:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise fail(
                f"cannot import job module {name!r} ({error}); fix JOBSTREAM_JOB_MODULES "
                "(a JSON list of importable module names)",
                USAGE,
            ) from None


def run(coroutine: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a command's async body; a jobstream error becomes one line and exit 1."""
    # The clients log their own connection failures; the CLI reports them as one line.
    for name in ("aiokafka", "nats"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        return asyncio.run(coroutine())
    except JobstreamError as error:
        raise fail(" ".join(str(error).split()), RUNTIME) from None


def register(app: typer.Typer) -> None:
    schemas = typer.Typer(help="Job type schemas (JSON Schema export for non-Python producers).")
    app.add_typer(schemas, name="schemas")

    @schemas.command("list")
    def list_types() -> None:
        """List the registered job types and versions."""
        import_job_modules(settings_for())
        for model in default_registry:
            typer.echo(
                f"{model.job_type} v{model.job_version}  {model.__module__}.{model.__qualname__}"
            )

    @schemas.command("export")
    def export(
        out: Annotated[
            Path, typer.Option(help="Directory to write (one file per type and version).")
        ] = DEFAULT_SCHEMA_DIR,
        check: Annotated[
            bool, typer.Option("--check", help="Write nothing; exit 1 if OUT is out of date.")
        ] = False,
    ) -> None:
        """Write the JSON Schema of every registered job type (from JOBSTREAM_JOB_MODULES)."""
        import_job_modules(settings_for())
        files = export_json_schemas(default_registry)
        stale = _stale(out, files)
        if check:
            if stale:
                raise fail(
                    f"{out} is out of date ({', '.join(stale)}): run `jobstream schemas "
                    "export` (or `make schemas`) and commit the result"
                )
            typer.echo(f"{out} is up to date ({len(files)} files)")
            return
        for relative in stale:
            path = out / relative
            if relative in files:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(files[relative], encoding="utf-8", newline="\n")
            else:
                path.unlink()
        typer.echo(f"wrote {out}: {len(files)} files, {len(stale)} changed")


def _stale(out: Path, files: dict[str, str]) -> list[str]:
    """Relative paths that differ between `out` and `files`: changed, missing or extra."""
    present = (
        {p.relative_to(out).as_posix() for p in out.rglob("*.json")} if out.is_dir() else set()
    )
    changed = [
        rel
        for rel, text in files.items()
        if rel not in present or (out / rel).read_text(encoding="utf-8") != text
    ]
    return sorted([*changed, *(present - files.keys())])
