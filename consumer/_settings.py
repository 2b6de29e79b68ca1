"""Worker settings: the producer's connection settings plus what the runtime needs.

Read like `ProducerSettings` (prefix `JOBSTREAM_`, nested with `__`, optional TOML file
named by `JOBSTREAM_CONFIG_FILE`). docs/configuration.md lists every setting.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from producer import ProducerSettings

OrderingMode = Literal["partition", "key", "none"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class WorkerSettings(_Frozen):
    """How a worker consumes, bounds and settles jobs."""

    group: str = "jobstream-workers"
    """Consumer group (Kafka) / durable consumer name (NATS) shared by every replica."""
    ordering: OrderingMode = "key"
    """`key`: one job at a time per ordering key, keys in parallel; `partition`: one at a
    time per partition; `none`: no ordering promise."""
    max_in_flight: int = Field(default=64, ge=1, le=100_000)
    """Jobs running or waiting for their key at once; fetching pauses at this bound."""
    fetch_max_records: int = Field(default=500, ge=1)
    """Most records taken from the broker per fetch."""
    job_timeout_s: float = Field(default=300.0, gt=0)
    """Default per-job timeout; a handler can override it. A timeout is a retriable failure."""
    drain_timeout_s: float = Field(default=25.0, gt=0)
    """On SIGTERM: how long in-flight jobs may run before they are cancelled (and not
    committed, so they are redelivered)."""
    revoke_timeout_s: float = Field(default=20.0, gt=0)
    """On a rebalance: how long to wait for in-flight jobs of revoked partitions."""
    commit_interval_s: float = Field(default=1.0, gt=0)
    """Commit settled offsets at least this often."""
    commit_every: int = Field(default=500, ge=1)
    """...or as soon as this many records settled since the last commit."""
    session_timeout_s: float = Field(default=30.0, gt=0)
    """Kafka group session timeout: a worker silent this long is evicted."""
    max_poll_interval_s: float = Field(default=300.0, gt=0)
    """Kafka: longest gap between fetches before the worker is considered stuck."""
    thread_pool_size: int = Field(default=8, ge=1)
    """Threads for synchronous handlers."""
    process_pool_size: int = Field(default=0, ge=0)
    """Processes for CPU-bound handlers (`cpu_bound=True`); 0 uses the CPU count."""
    subscribe_types: list[str] = Field(default_factory=list)
    """Job types to consume (default: every type the app has a handler for)."""


class IdempotencySettings(_Frozen):
    """Where completed job ids are remembered, so a redelivered job runs once."""

    backend: Literal["memory", "redis", "postgres"] = "memory"
    """`memory` is per process (tests, single worker); use `redis` or `postgres` for groups."""
    url: SecretStr | None = None
    """Connection URL of the backend (`redis://host:6379/0`, `postgresql://user@host/db`)."""
    lease_s: float = Field(default=60.0, gt=0)
    """How long a claim is held before another worker may take the job over; renewed while
    the job runs."""
    retention_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    """How long a completed job id is remembered (bound on the store's size)."""
    namespace: str = "jobstream"
    """Key prefix (Redis) / table name prefix (PostgreSQL), to share one server safely."""

    @model_validator(mode="after")
    def _url_for_remote_backends(self) -> Self:
        if self.backend != "memory" and self.url is None:
            msg = (
                f"idempotency backend {self.backend!r} needs a URL: set JOBSTREAM_IDEMPOTENCY__URL"
            )
            raise ValueError(msg)
        return self


class HealthSettings(_Frozen):
    """The liveness / readiness HTTP endpoint."""

    host: str = "127.0.0.1"
    """Address to bind; in a container set 0.0.0.0 so the kubelet can reach it."""
    port: int = Field(default=8080, ge=0, le=65535)
    """Port of `/livez`, `/readyz` (and `/metrics`); 0 turns the endpoint off."""


class LoggingSettings(_Frozen):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of the `jobstream` loggers."""
    format: Literal["json", "text"] = "json"
    """`json`: one JSON object per line (for log pipelines); `text`: for people."""


class Settings(ProducerSettings):
    """Everything a worker needs."""

    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    idempotency: IdempotencySettings = Field(default_factory=IdempotencySettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
