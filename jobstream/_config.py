"""Load settings for a CLI command: flags over environment over config file, and turn a
bad value into one line that names the environment variable to fix."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import typer
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from producer._settings import CONFIG_FILE_ENV, ENV_PREFIX

S = TypeVar("S", bound=BaseSettings)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` on stderr and return the exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def load_settings(cls: type[S], **overrides: Any) -> S:
    """`cls` from the environment, with `overrides` (dotted paths: "worker.group") on top."""
    config_file = os.environ.get(CONFIG_FILE_ENV)
    if config_file and not Path(config_file).is_file():
        raise fail(f"{CONFIG_FILE_ENV}={config_file}: no such file; point it at a TOML file")
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        target = nested
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    try:
        if nested:
            # Flags replace single fields; the rest of each section still comes from env.
            base = cls()
            merged = _merge(base.model_dump(), nested)
            return cls.model_validate(merged)
        return cls()
    except ValidationError as error:
        first = error.errors()[0]
        path = [str(part) for part in first["loc"]]
        env_var = ENV_PREFIX + "__".join(path).upper()
        raise fail(f"invalid setting {env_var} ({'.'.join(path)}): {first['msg']}", 2) from None


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _merge(result[key], value)
        else:
            result[key] = value
    return result
