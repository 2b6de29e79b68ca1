"""Connection and routing settings shared by the producer and the worker.

Every field is read from the environment with the prefix `JOBSTREAM_`, nested with `__`
(`JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS`), from an optional TOML file named by
`JOBSTREAM_CONFIG_FILE`, or given explicitly. Secrets are `SecretStr`: their values never
appear in `repr`, logs or error messages. docs/configuration.md lists every setting.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from producer.secrets import secret_text

Transport = Literal["kafka", "nats", "memory"]
Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")
"""The priority levels, highest first (docs/scheduling.md, "Priorities")."""
_LEVEL_SUFFIX = ".priority-"
ENV_PREFIX = "JOBSTREAM_"
CONFIG_FILE_ENV = "JOBSTREAM_CONFIG_FILE"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Frozen):
    """How to reach Kafka."""

    bootstrap_servers: str = "127.0.0.1:9092"
    """Comma-separated host:port list of brokers to bootstrap from."""
    client_id: str = "jobstream"
    """Client id reported to the brokers (shows up in broker logs and quotas)."""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """Transport security; SASL_SSL is what managed Kafka services expect."""
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    """SASL mechanism when `security_protocol` is SASL_*."""
    sasl_username: str | None = None
    """SASL user name."""
    sasl_password: SecretStr | None = None
    """SASL password (secret)."""
    sasl_password_file: Path | None = None
    """A file holding the SASL password (a mounted Kubernetes Secret; one trailing newline
    is ignored), read each time a client starts (each command; a worker or ingress at its
    start): a rotated password takes effect at the next start. Give it or `sasl_password`,
    not both."""
    ssl_cafile: Path | None = None
    """CA bundle to verify the brokers' certificates (default: the system store)."""
    ssl_certfile: Path | None = None
    """Client certificate for mutual TLS."""
    ssl_keyfile: Path | None = None
    """Private key of the client certificate."""
    ssl_password: SecretStr | None = None
    """Password of the private key (secret)."""
    connect_timeout_s: float = Field(default=10.0, gt=0)
    """How long `start()` keeps trying to reach a broker (retrying with backoff) before it
    fails with `BrokerUnavailable`."""
    request_timeout_s: float = Field(default=30.0, gt=0)
    """Timeout of one request to a broker. The producer uses at most `publish_timeout_s`, so
    a record that cannot be delivered in time expires instead of being sent later."""
    publish_timeout_s: float = Field(default=15.0, gt=0)
    """How long a publish may wait for the broker's acknowledgement before it fails."""
    linger_ms: int = Field(default=5, ge=0)
    """How long the producer waits to fill a batch; small values favour latency."""
    max_batch_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Largest record batch the producer builds per partition."""
    compression: Literal["none", "gzip"] = "none"
    """Record batch compression."""

    @model_validator(mode="after")
    def _one_password(self) -> KafkaSettings:
        _one_of(self.sasl_password, self.sasl_password_file, "kafka.sasl_password")
        return self

    def sasl_password_text(self) -> str | None:
        """The SASL password, from `sasl_password` or `sasl_password_file` (`ValueError`
        naming the setting if the file cannot be read)."""
        return secret_text(self.sasl_password, self.sasl_password_file, "kafka.sasl_password")


class NatsSettings(_Frozen):
    """How to reach NATS JetStream."""

    servers: list[str] = Field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    """NATS server URLs (env: a JSON list, e.g. `["nats://a:4222","nats://b:4222"]`)."""
    name: str = "jobstream"
    """Connection name shown by the server's monitoring."""
    credentials_file: Path | None = None
    """A `.creds` file (JWT + nkey seed) for decentralised auth."""
    nkey_seed_file: Path | None = None
    """A file holding an nkey seed."""
    token: SecretStr | None = None
    """Token authentication (secret)."""
    user: str | None = None
    """User name for user/password authentication."""
    token_file: Path | None = None
    """A file holding the token (a mounted Secret), read when a client starts; or `token`."""
    password: SecretStr | None = None
    """Password for user/password authentication (secret)."""
    password_file: Path | None = None
    """A file holding the password (a mounted Secret), read when a client starts; or
    `password`."""
    tls_ca_file: Path | None = None
    """CA bundle to verify the server (turns TLS on)."""
    tls_cert_file: Path | None = None
    """Client certificate for mutual TLS."""
    tls_key_file: Path | None = None
    """Private key of the client certificate."""
    connect_timeout_s: float = Field(default=5.0, gt=0)
    """How long `start()` keeps trying to connect (each attempt is bounded by it too) before
    it fails with `BrokerUnavailable`."""
    publish_timeout_s: float = Field(default=15.0, gt=0)
    """How long a publish may wait for the JetStream acknowledgement."""
    max_reconnect_attempts: int = Field(default=60, ge=-1)
    """Reconnect attempts before the connection is given up (-1: forever)."""
    reconnect_wait_s: float = Field(default=2.0, gt=0)
    """Pause between reconnect attempts."""
    reconnect_buffer_bytes: int = Field(default=0, ge=0)
    """Bytes of publishes buffered while reconnecting. 0 (the default) fails a publish at once
    while the connection is down, so a publish that reported an error is never sent later."""
    max_in_flight: int = Field(default=1000, ge=1)
    """Most publishes awaiting their JetStream acknowledgement at once in `publish_many`."""

    @model_validator(mode="after")
    def _one_secret_each(self) -> NatsSettings:
        _one_of(self.token, self.token_file, "nats.token")
        _one_of(self.password, self.password_file, "nats.password")
        return self


def _one_of(value: SecretStr | None, file: Path | None, setting: str) -> None:
    if value is not None and file is not None:
        msg = f"give {setting} or {setting}_file, not both"
        raise ValueError(msg)


class RoutingSettings(_Frozen):
    """Where each job type is published: topic (Kafka) or subject and stream (NATS)."""

    topic_prefix: str = "jobs."
    """Default Kafka topic of a job type: prefix + type (`jobs.email.welcome`)."""
    routes: dict[str, str] = Field(default_factory=dict)
    """Per-type overrides, job type -> topic / subject (env: JSON object)."""
    subject_prefix: str = "jobs."
    """Default NATS subject of a job type: prefix + type."""
    stream: str = "JOBS"
    """JetStream stream that captures `<subject_prefix>>`."""
    stream_max_age_s: float = Field(default=7 * 24 * 3600.0, ge=0)
    """How long the stream keeps a message (0: no limit)."""
    stream_max_bytes: int = Field(default=-1, ge=-1)
    """Size limit of the stream in bytes (-1: no limit); the oldest messages go first."""
    duplicate_window_s: float = Field(default=120.0, gt=0)
    """Window in which JetStream drops a publish whose `Nats-Msg-Id` (the job id) it saw."""
    partitions: int = Field(default=6, ge=1)
    """Partitions of topics created by `jobstream topics ensure`."""
    replication_factor: int = Field(default=0, ge=0)
    """Replicas of the topics, streams and buckets `topics ensure` creates; 0 (the default)
    chooses from the cluster's size: 3 on a cluster of 3 or more nodes, else the node count
    (1 on a single broker). Kafka topics get `min.insync.replicas` 2 with 3 or more
    replicas, else 1 (docs/operations.md)."""

    def replicas_for(self, nodes: int) -> tuple[int, int]:
        """(replicas, Kafka `min.insync.replicas`) on a cluster of `nodes` brokers or
        servers: `replication_factor` if set, else min(3, nodes); min in-sync 2 from 3
        replicas on (a write survives one lost replica; the classic RF 3 / ISR 2), else 1."""
        replicas = self.replication_factor or min(3, max(nodes, 1))
        return replicas, 2 if replicas >= 3 else 1

    priorities: bool = False
    """Three priority levels (`high`, `normal`, `low`): a job published with `priority=`
    `high` or `low` goes to `<destination>.priority-<level>` (a topic or subject of its own),
    `normal` to the destination itself; workers read every level, weighted by
    `worker.priority_weights`, and `topics ensure` creates them. Off: only `normal`."""

    @field_validator("topic_prefix", "subject_prefix")
    @classmethod
    def _no_spaces(cls, value: str) -> str:
        if any(ch.isspace() for ch in value):
            msg = "must not contain whitespace"
            raise ValueError(msg)
        return value

    def topic(self, job_type: str) -> str:
        return self.routes.get(job_type, f"{self.topic_prefix}{job_type}")

    def subject(self, job_type: str) -> str:
        return self.routes.get(job_type, f"{self.subject_prefix}{job_type}")

    def destination(
        self, transport: Transport, job_type: str, priority: Priority = "normal"
    ) -> str:
        """The subject (NATS) or topic (Kafka, memory) of `job_type` at `priority`;
        `ValueError` for a level other than `normal` while `priorities` is off."""
        base = self.subject(job_type) if transport == "nats" else self.topic(job_type)
        return self.level_destination(base, priority)

    def level_destination(self, destination: str, priority: Priority) -> str:
        """`destination` (a level's own, or the normal one) at `priority`."""
        base = destination_level(destination)[0]
        if priority == "normal":
            return base
        if priority not in PRIORITIES:
            msg = f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}"
            raise ValueError(msg)
        if not self.priorities:
            msg = (
                f"priority {priority!r} needs routing.priorities on "
                "(JOBSTREAM_ROUTING__PRIORITIES=true) in the producer and the workers"
            )
            raise ValueError(msg)
        return f"{base}{_LEVEL_SUFFIX}{priority}"

    def level_destinations(self, destination: str) -> list[str]:
        """Every level of `destination`, highest first (only itself with `priorities` off)."""
        if not self.priorities:
            return [destination]
        return [self.level_destination(destination, level) for level in PRIORITIES]


def destination_level(destination: str) -> tuple[str, Priority]:
    """(`normal` destination, level) of a topic or subject named by `level_destination`."""
    base, _, level = destination.rpartition(_LEVEL_SUFFIX)
    if base and level in ("high", "low"):
        return base, "high" if level == "high" else "low"
    return destination, "normal"


class SpoolSettings(_Frozen):
    """The producer's durable spool for outages (docs/producer.md, "The spool"): off unless
    `path` is set."""

    path: Path | None = None
    """SQLite file that keeps the jobs the broker could not take (None: no spool, a publish
    that fails raises). It names a set of slot files, `<path>`, `<path>.1`, ... : each
    process owns the first free one (an exclusive `flock` on the file itself), so the
    workers of one server (gunicorn, uWSGI, a fork) can share the setting."""
    max_processes: int = Field(default=16, ge=1, le=1000)
    """Slot files of `path` (processes that can own a spool on it at once); one more raises
    `SpoolLocked`."""
    max_jobs: int = Field(default=100_000, ge=1)
    """Most jobs the spool holds; a publish that would go past it raises `SpoolFull`."""
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    """Most bytes of encoded jobs (headers + body) the spool holds; past it, `SpoolFull`."""
    drain_batch: int = Field(default=500, ge=1)
    """Jobs the drainer publishes per `send_many` while it empties the spool."""
    retry_initial_s: float = Field(default=0.5, gt=0)
    """First wait before the drainer tries the broker again after a failure, in seconds;
    each later wait doubles (jittered 0.5x to 1.5x) up to `retry_max_s`."""
    retry_max_s: float = Field(default=10.0, gt=0)
    """Longest wait between the drainer's attempts, in seconds."""
    stop_drain_s: float = Field(default=10.0, ge=0)
    """How long `stop()` keeps draining before it leaves the rest on disk for the next
    producer on this path, in seconds."""


_UNIQUE_SCHEMES = ("redis://", "rediss://", "unix://", "postgresql://", "postgres://", "nats://")
_UNIQUE_NAMESPACE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class UniqueSettings(_Frozen):
    """The shared store of unique keys (`publish(unique_key=..., unique_for=...)`,
    docs/scheduling.md, "Unique jobs"): off unless `url` is set."""

    url: SecretStr | None = None
    """Where unique keys live, shared by every producer that must see them: `redis://...`,
    `postgresql://...` (psycopg; the `postgres` extra), `nats://` (a JetStream key-value
    bucket over the `nats` connection settings; `nats://host:port` replaces their servers)
    or `memory` (this producer only: tests, the memory transport). None: a publish with a
    `unique_key` raises `ValueError`."""
    password_file: Path | None = None
    """A file holding the Redis or PostgreSQL password (a mounted Kubernetes Secret; one
    trailing newline is ignored), put into `url` when the store connects, so the URL
    itself holds none (docs/security.md)."""
    namespace: str = "jobstream"
    """Prefix of the keys (Redis: `<namespace>:unique:<key>`), table (PostgreSQL:
    `<namespace>_unique`) or bucket (NATS: `<namespace>_unique`)."""
    max_for_s: float = Field(default=7 * 24 * 3600.0, gt=0, le=366 * 24 * 3600.0)
    """Longest `unique_for` a publish may ask for, in seconds, at most a year (also the
    NATS bucket's `max_age`, plus `lease_s`)."""
    lease_s: float = Field(default=30.0, gt=0)
    """How long a publish holds a key it reserved while it publishes. Another publish of
    the key waits for it (at most twice this), and takes the reservation over, with its job
    id, once it ran out (its publisher died). Keep it above the publish timeout."""
    timeout_s: float = Field(default=5.0, gt=0)
    """Bound on each store operation; past it the publish raises `UniqueStoreUnavailable`."""

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, url: SecretStr | None) -> SecretStr | None:
        value = url.get_secret_value() if url is not None else ""
        conninfo = "://" not in value and "=" in value  # a PostgreSQL conninfo string
        if url is None or value == "memory" or value.startswith(_UNIQUE_SCHEMES) or conninfo:
            return url
        msg = (
            "unique.url must start with redis://, rediss://, postgresql://, nats:// or be "
            f"memory (found {value.split('://')[0] + '://' if '://' in value else 'no scheme'})"
        )
        raise ValueError(msg)

    @field_validator("namespace")
    @classmethod
    def _plain_namespace(cls, namespace: str) -> str:
        if not _UNIQUE_NAMESPACE.fullmatch(namespace):
            msg = f"unique.namespace {namespace!r} must be letters, digits and '_'"
            raise ValueError(msg)
        return namespace


class ProducerSettings(BaseSettings):
    """Everything a service needs to publish jobs."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    transport: Transport = "kafka"
    """Broker to publish to: `kafka`, `nats`, or `memory` (in-process, for tests/examples)."""
    source: str = "/jobstream"
    """CloudEvents `source` of published jobs: a URI-reference naming the producing service."""
    create_missing: bool = False
    """Create missing topics/streams at publish time. Off in production: provision with
    `jobstream topics ensure` so a typo in a job type never creates a topic silently."""
    job_modules: list[str] = Field(default_factory=lambda: ["schemas.examples"])
    """Python modules imported by the CLI to register job types."""
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    """How to reach Kafka (`JOBSTREAM_KAFKA__*`)."""
    nats: NatsSettings = Field(default_factory=NatsSettings)
    """How to reach NATS JetStream (`JOBSTREAM_NATS__*`)."""
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    """Topic, subject and stream names, and how `topics ensure` creates them."""
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    """The durable spool for outages (`JOBSTREAM_SPOOL__*`); off by default."""
    unique: UniqueSettings = Field(default_factory=UniqueSettings)
    """The shared store of unique keys (`JOBSTREAM_UNIQUE__*`); off by default."""

    def destination(self, job_type: str) -> str:
        """Where jobs of `job_type` go: its subject on NATS, its topic on Kafka and memory."""
        return self.routing.destination(self.transport, job_type)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments (CLI flags), environment, then the config file.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return (*sources, file_secret_settings)
