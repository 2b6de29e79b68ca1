"""`jobstream schemas ...`: list job types and export their JSON Schemas."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jobstream._config import fail, import_job_modules, settings_for
from schemas import default_registry, export_json_schemas

DEFAULT_SCHEMA_DIR = Path("schemas/jsonschema")


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
