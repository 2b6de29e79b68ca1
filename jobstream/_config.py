"""What every CLI command shares: settings (flags over environment over config file), job
modules, and running an async body, with errors turned into one line.

Exit codes: 0 success, 1 a run-time failure (broker, stale files), 2 a usage error (a bad
flag, payload or setting). Every error is one line on stderr: `error: <what> ...<fix>`.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import re
import tomllib
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import typer
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsError

from producer import CONFIG_FILE_ENV, ENV_PREFIX, ProducerSettings
from schemas import JobstreamError

S = TypeVar("S", bound=BaseSettings)
T = TypeVar("T")
USAGE = 2
RUNTIME = 1


def fail(message: str, code: int = RUNTIME) -> typer.Exit:
    """Print `error: message` on stderr and return the exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def load_settings(cls: type[S], **overrides: Any) -> S:
    """`cls` from the environment, with `overrides` (dotted paths: "worker.group"; None:
    not given) on top. A bad value exits 2 with one line naming its environment variable."""
    config_file = os.environ.get(CONFIG_FILE_ENV)
    if config_file and not Path(config_file).is_file():
        raise fail(f"{CONFIG_FILE_ENV}={config_file}: no such file; point it at a TOML file", USAGE)
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
        if not nested:
            return cls()
        # Flags replace single fields; the rest of each section still comes from env.
        return cls.model_validate(_merge(cls().model_dump(), nested))
    except ValidationError as error:
        first = error.errors()[0]
        path = [str(part) for part in first["loc"]]
        env_var = ENV_PREFIX + "__".join(path).upper()
        raise fail(f"invalid setting {env_var} ({'.'.join(path)}): {first['msg']}", USAGE) from None
    except tomllib.TOMLDecodeError as error:  # its message ends "(at line L, column C)"
        raise fail(
            f"{CONFIG_FILE_ENV}={config_file} is not valid TOML: {error}; fix the file there "
            f"(see docs/configuration.md) or unset {CONFIG_FILE_ENV}",
            USAGE,
        ) from None
    except (OSError, UnicodeDecodeError) as error:  # only the config file is read
        raise fail(
            f"cannot read {CONFIG_FILE_ENV}={config_file}: {error}; point it at a readable "
            "UTF-8 TOML file",
            USAGE,
        ) from None
    except SettingsError as error:  # an env value that is not valid JSON for a list/object
        field = re.search(r'field "(\w+)"', str(error))
        where = f"{ENV_PREFIX}{field.group(1).upper()}*" if field else f"a {ENV_PREFIX}* variable"
        raise fail(
            f"invalid setting in {where}: {error} (values of lists and objects are JSON, e.g. "
            "JOBSTREAM_NATS__SERVERS='[\"nats://a:4222\"]'; see docs/configuration.md)",
            USAGE,
        ) from None


class OutboxSettings(BaseModel):
    """The transactional outbox and its relay (`JOBSTREAM_OUTBOX__*`, docs/outbox.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: SecretStr | None = None
    """PostgreSQL URL of the database that holds the outbox table (the one the producing
    service writes its own rows to), e.g. `postgresql://app@db:5432/app`. Required by
    `jobstream outbox relay`."""
    password_file: Path | None = None
    """A file holding the database password (a mounted Kubernetes Secret; one trailing
    newline is ignored), put into `url` when the relay connects (docs/security.md)."""
    table: str = Field(default="jobstream_outbox", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,50}$")
    """The outbox table (a plain SQL identifier); the relay creates it if missing."""
    batch_size: int = Field(default=500, ge=1, le=10_000)
    """Most rows the relay reads and publishes per round."""
    poll_s: float = Field(default=0.2, gt=0, le=60)
    """The relay's wait after a round that found nothing (seconds)."""
    standby_poll_s: float = Field(default=1.0, gt=0, le=60)
    """How often a standby relay replica tries to take the publishing lock (seconds)."""
    retention_s: float = Field(default=7 * 86400.0, ge=0)
    """Sent rows are deleted this long after they were sent (seconds)."""
    prune_every_s: float = Field(default=60.0, gt=0)
    """How often the relay deletes sent rows past `retention_s` (seconds)."""
    health_port: int = Field(default=0, ge=0, le=65535)
    """Port of the relay's `/livez` and `/readyz`; 0: no health endpoint."""
    liveness_silence_s: float = Field(default=60.0, gt=0)
    """`/livez` answers 503 when no relay round ended for this long (seconds)."""


class OutboxRelaySettings(ProducerSettings):
    """The producer's settings plus the `outbox` section: what `jobstream outbox` reads."""

    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    """The transactional outbox and its relay (`JOBSTREAM_OUTBOX__*`)."""


def settings_for(**flags: Any) -> ProducerSettings:
    """Producer settings: `flags` over environment over config file."""
    return load_settings(ProducerSettings, **flags)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _merge(result[key], value)
        else:
            result[key] = value
    return result


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
    quiet_tls_eof_notice()
    try:
        return asyncio.run(coroutine())
    except JobstreamError as error:
        raise fail(" ".join(str(error).split()), RUNTIME) from None
    except ValueError as error:
        raise refused(error) from None


def quiet_tls_eof_notice() -> None:
    """Drop asyncio's notice when a TLS connection of nats-py closes (see below)."""
    logging.getLogger("asyncio").addFilter(_no_tls_eof_notice)


def _no_tls_eof_notice(record: logging.LogRecord) -> bool:
    # asyncio's notice when a TLS connection of nats-py closes (its protocol asks to keep
    # the transport half open, which TLS cannot): harmless, and not the user's to fix.
    return not str(record.msg).startswith("returning true from eof_received()")


def refused(error: ValueError) -> typer.Exit:
    """A broker or store client refused a combination the settings model let through (e.g.
    SASL without credentials): one line and exit 2, as any other bad setting."""
    reason = " ".join(str(error).split())
    return fail(
        f"the settings were refused: {reason}; fix the JOBSTREAM_* setting it names "
        "(see docs/configuration.md)",
        USAGE,
    )
