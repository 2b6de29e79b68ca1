"""Worker settings: the producer's connection settings plus what the runtime needs.

Read like `ProducerSettings` (prefix `JOBSTREAM_`, nested with `__`, optional TOML file
named by `JOBSTREAM_CONFIG_FILE`). docs/configuration.md lists every setting.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from producer import PRIORITIES, Priority, ProducerSettings
from producer.secrets import read_secret_file

OrderingMode = Literal["partition", "key", "none"]
_URL_SCHEMES = {
    "redis": ("redis://", "rediss://", "unix://"),
    "postgres": ("postgresql://", "postgres://"),
    "nats-kv": ("nats://", "tls://", "ws://", "wss://"),
}
"""The URL schemes each store's client accepts (PostgreSQL also takes `key=value` pairs)."""
_NAMESPACES = {
    "postgres": (
        re.compile(r"[A-Za-z_][A-Za-z0-9_]*"),
        "a letter or '_', then letters, digits, '_'",
    ),
    "nats-kv": (re.compile(r"[A-Za-z0-9_-]+"), "letters, digits, '_' or '-'"),
}
"""What a namespace may hold where it becomes a name (a table, a bucket)."""


def _one_of(names: tuple[str, ...]) -> str:
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _default_weights() -> dict[Priority, int]:
    return {"high": 6, "normal": 3, "low": 1}


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
    max_held_offsets: int = Field(default=100_000, ge=1)
    """Kafka: most records one partition may hold from its oldest unsettled
    record on (the settled ones behind it included, which cannot be committed yet). Past
    it the partition is paused until that record settles, so one long job does not make
    the worker remember every later offset (G4)."""
    job_timeout_s: float = Field(default=300.0, gt=0)
    """Default per-job timeout; a handler can override it. A timeout is a retriable failure."""
    drain_timeout_s: float = Field(default=25.0, gt=0)
    """On SIGTERM: how long in-flight jobs may run before they are cancelled (and not
    committed, so they are redelivered)."""
    revoke_timeout_s: float = Field(default=20.0, gt=0)
    """On a rebalance: how long to wait for in-flight jobs of revoked partitions before
    they are cancelled (and not committed)."""
    cancel_grace_s: float = Field(default=2.0, gt=0)
    """After the runtime cancels a job (drain or revoke timeout, job timeout): how long its
    handler may take to stop before the worker abandons it (reported, never settled)."""
    commit_interval_s: float = Field(default=1.0, gt=0)
    """Commit settled offsets at least this often."""
    commit_every: int = Field(default=500, ge=1)
    """...or as soon as this many records settled since the last commit."""
    session_timeout_s: float = Field(default=30.0, gt=0)
    """Kafka group session timeout: a worker silent this long is evicted."""
    max_poll_interval_s: float = Field(default=300.0, gt=0)
    """Kafka: longest gap between fetches before the worker is considered stuck."""
    broker_wait_s: float = Field(default=60.0, gt=0)
    """At start-up, how long to retry (with backoff) a broker, or an idempotency or status
    store, that does not answer before the worker exits non-zero with a clear error."""
    thread_pool_size: int = Field(default=8, ge=1)
    """Threads for synchronous handlers."""
    process_pool_size: int = Field(default=0, ge=0)
    """Processes for CPU-bound handlers (`cpu_bound=True`); 0 uses the CPU count."""
    subscribe_types: list[str] = Field(default_factory=list)
    """Job types to consume (default: every type the app has a handler for)."""
    priority_weights: dict[Priority, Annotated[StrictInt, Field(ge=1, le=1000)]] = Field(
        default_factory=_default_weights
    )
    """With `routing.priorities`: the share of jobs each level gets while every level has
    a backlog (weighted round robin: 6/3/1 runs 60% high, 30% normal, 10% low), so a low
    job is never starved. A level left out keeps its default; a weight is 1 to 1000
    (env: JSON object, `JOBSTREAM_WORKER__PRIORITY_WEIGHTS='{"high": 8}'`)."""

    @field_validator("priority_weights")
    @classmethod
    def _every_level(cls, value: dict[Priority, int]) -> dict[Priority, int]:
        defaults = _default_weights()
        return {level: value.get(level, defaults[level]) for level in PRIORITIES}


class IdempotencySettings(_Frozen):
    """Where completed job ids are remembered, so a redelivered job runs once."""

    backend: Literal["memory", "redis", "postgres", "nats-kv"] = "memory"
    """`memory` is per process (tests, single worker); use `redis`, `postgres` or `nats-kv`
    (a JetStream key-value bucket) for groups."""
    url: SecretStr | None = None
    """Connection URL of the backend (`redis://host:6379/0`, `postgresql://user@host/db`).
    `nats-kv` needs none: it uses the `nats` connection settings (a `nats://` URL here
    replaces their servers; their credentials and TLS still apply). TLS: `rediss://...
    ?ssl_ca_certs=/ca.pem`, `postgresql://...?sslmode=verify-full&sslrootcert=/ca.pem`."""
    password_file: Path | None = None
    """A file holding the store's password (a mounted Kubernetes Secret; one trailing
    newline is ignored), put into `url` at connect time, so the URL itself holds none."""
    lease_s: float = Field(default=60.0, gt=0)
    """How long a claim lives without a renewal; renewed every third of it while the job
    runs. A run that cannot renew its claim for a whole lease, or finds it taken, is cut
    off. Another delivery of the job waits, and takes a claim over only after it saw it
    unchanged for a whole lease."""
    record_timeout_s: float = Field(default=300.0, gt=0)
    """How long a finished job's completion is retried while the store cannot record it
    (with backoff, the claim kept, the job unsettled). Past it the worker stops with
    `WorkerError` (exit 1); the job's record is delivered again, nothing is lost."""
    retention_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    """How long a completed job id is remembered (bound on the store's size)."""
    namespace: str = "jobstream"
    """Key prefix (Redis) / table name prefix (PostgreSQL) / bucket name prefix (NATS KV:
    `<namespace>_idempotency`), to share one server safely."""

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, url: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        backend = info.data.get("backend", "")
        schemes = _URL_SCHEMES.get(backend)
        value = url.get_secret_value() if url is not None else ""
        conninfo = backend == "postgres" and "://" not in value and "=" in value
        if url is None or schemes is None or value.startswith(schemes) or conninfo:
            return url
        scheme = value.split("://")[0] + "://" if "://" in value else "no scheme"
        msg = f"the {backend} store needs a URL starting with {_one_of(schemes)} (found {scheme})"
        raise ValueError(msg)

    @field_validator("namespace")
    @classmethod
    def _namespace_names(cls, namespace: str, info: ValidationInfo) -> str:
        rule = _NAMESPACES.get(info.data.get("backend", ""))
        if rule is not None and not rule[0].fullmatch(namespace):
            msg = f"{namespace!r} cannot name a {info.data['backend']} store: use {rule[1]}"
            raise ValueError(msg)
        return namespace

    @model_validator(mode="after")
    def _url_for_remote_backends(self) -> Self:
        if self.backend in ("redis", "postgres") and self.url is None:
            msg = (
                f"idempotency backend {self.backend!r} needs a URL: set JOBSTREAM_IDEMPOTENCY__URL"
            )
            raise ValueError(msg)
        return self


class RetryPolicy(_Frozen):
    """How often, and how far apart, a failed job is tried again."""

    max_attempts: int = Field(default=5, ge=1, le=1000)
    """Attempts in all, the first included; after the last the job is dead-lettered."""
    initial_delay_s: float = Field(default=1.0, ge=0)
    """Delay before the second attempt."""
    multiplier: float = Field(default=2.0, ge=1)
    """Each further delay is this many times the previous one (exponential backoff)."""
    max_delay_s: float = Field(default=600.0, ge=0)
    """Cap on one delay."""
    jitter: float = Field(default=0.2, ge=0, le=1)
    """Each delay is drawn uniformly from [delay * (1 - jitter), delay], so retries of jobs
    that failed together spread out."""
    budget_s: float = Field(default=24 * 3600.0, gt=0)
    """Total time from the first failure after which no retry is scheduled."""

    def delay_s(self, failed_attempt: int, draw: float) -> float:
        """The delay after attempt `failed_attempt` failed; `draw` is uniform in [0, 1)."""
        try:
            grown = self.initial_delay_s * self.multiplier ** (failed_attempt - 1)
        except OverflowError:  # a large multiplier to a large attempt: past every cap
            grown = self.max_delay_s
        return min(self.max_delay_s, grown) * (1 - self.jitter * draw)


class RetrySettings(_Frozen):
    """Failure routing: retry tiers, the dead-letter topic, what is never retried."""

    policy: RetryPolicy = Field(default_factory=RetryPolicy)
    """The default policy (env: `JOBSTREAM_RETRY__POLICY__MAX_ATTEMPTS`, ...)."""
    per_type: dict[str, RetryPolicy] = Field(default_factory=dict)
    """Policies by job type, replacing the default (env: JSON object)."""
    non_retriable: list[str] = Field(default_factory=list)
    """Exception classes (`module.Qualname`, subclasses included) that dead-letter at once."""
    tiers_s: list[float] = Field(default_factory=lambda: [5.0, 30.0, 300.0, 1800.0])
    """Delays of the retry tier topics, ascending. A retry goes to the first tier at least
    as long as its delay (the last tier for longer delays) and waits there until due."""
    retry_topic_suffix: str = ".retry."
    """Tier n of topic T is `T + suffix + n` (`jobs.email.welcome.retry.1`)."""
    dead_letter_suffix: str = ".dlq"
    """The dead-letter topic of topic T is `T + suffix` (`jobs.email.welcome.dlq`)."""
    replay_ledger_topic: str = "jobstream.dlq-replays"
    """Compacted topic that records which dead letters were replayed."""
    in_place: bool = False
    """Strict order: retry a failed job in its lane (with the policy's backoff) instead of
    through a tier topic, so later jobs of the same key wait for it."""
    hand_off_timeout_s: float = Field(default=300.0, gt=0)
    """How long a failed job's hand-off (its retry record or dead letter) is retried while
    the broker is unavailable (a transient publish error), with backoff, the job unsettled.
    Past it the worker stops with `WorkerError` (exit 1) so the orchestrator restarts it;
    the job's record is delivered again, nothing is lost."""

    @model_validator(mode="after")
    def _tiers_ascending(self) -> Self:
        if not self.tiers_s or sorted(self.tiers_s) != self.tiers_s or self.tiers_s[0] <= 0:
            msg = "tiers_s must be a non-empty ascending list of positive delays in seconds"
            raise ValueError(msg)
        return self

    def policy_for(self, job_type: str | None) -> RetryPolicy:
        return self.per_type.get(job_type or "", self.policy)

    def tier_topics(self, topic: str) -> list[str]:
        return [f"{topic}{self.retry_topic_suffix}{n}" for n in range(1, len(self.tiers_s) + 1)]

    def tier_for(self, topic: str, delay_s: float) -> str:
        index = next((i for i, tier in enumerate(self.tiers_s) if tier >= delay_s), None)
        return self.tier_topics(topic)[len(self.tiers_s) - 1 if index is None else index]

    def failure_topics(self, topics: Iterable[str]) -> list[str]:
        """The retry tier topics (none with `in_place`) and the dead-letter topic of each of
        `topics`: where a worker of them publishes failed jobs."""
        found: list[str] = []
        for topic in topics:
            if not self.in_place:
                found.extend(self.tier_topics(topic))
            found.append(self.dead_letter_topic(topic))
        return found

    def dead_letter_topic(self, topic: str) -> str:
        return f"{topic}{self.dead_letter_suffix}"

    def main_topic(self, topic: str) -> str:
        """The main topic a tier topic belongs to (a main topic maps to itself)."""
        head, sep, tail = topic.rpartition(self.retry_topic_suffix)
        return head if sep and tail.isdigit() else topic


class JetStreamSettings(_Frozen):
    """How a worker consumes NATS JetStream (`transport = "nats"`); see docs/nats.md."""

    ack_wait_s: float = Field(default=30.0, ge=1)
    """How long JetStream waits for an acknowledgement before it redelivers a message. Jobs
    that run longer keep their message with `in_progress` heartbeats."""
    progress_interval_s: float | None = Field(default=None, gt=0)
    """Heartbeat (`in_progress`) period for every fetched, unsettled message; default a third
    of `ack_wait_s`. Must be below `ack_wait_s`."""
    max_ack_pending: int = Field(default=1000, ge=1)
    """Unacknowledged messages of the group's consumer at once, over all replicas, retries
    waiting for their delayed redelivery included; JetStream delivers nothing more past it."""
    max_deliver_margin: int = Field(default=3, ge=1, le=100)
    """Deliveries allowed beyond the largest `max_attempts` of the retry policies, for
    redeliveries that are not failures (a crash, an expired ack wait, a drain cut-off).
    The consumer's `max_deliver` is that largest `max_attempts` plus this margin."""
    key_partitions: int = Field(default=0, ge=0, le=1024)
    """0: one consumer per group, no ordering promise across jobs. N > 0: producers publish
    a job to `<subject>.<n>`, n = FNV-1a(key) mod N, and each partition is consumed one job
    at a time, so jobs of one key run in publish order. `jobstream topics ensure` records N
    in the stream's metadata; producers read it from there."""
    pull_expires_s: float = Field(default=5.0, gt=0)
    """How long one pull request waits at the server for messages before it is renewed."""
    dead_letter_stream: str | None = None
    """Stream of the dead letters (default: `<routing.stream>_DLQ`)."""
    dead_letter_prefix: str = "dlq."
    """A job consumed from subject S is dead-lettered to `<prefix>S`."""
    dead_letter_max_age_s: float = Field(default=30 * 24 * 3600.0, ge=0)
    """How long the dead-letter stream keeps a message (0: no limit)."""
    kv_max_bytes: int = Field(default=-1, ge=-1)
    """Size limit of the idempotency KV bucket (-1: none); when full, claims fail and jobs
    wait (the store outage is retried) instead of running unrecorded."""
    replay_ledger_bucket: str = "jobstream_dlq_replays"
    """KV bucket that records which dead letters were replayed."""
    first_failure_bucket: str = "jobstream_first_failures"
    """KV bucket that records when each retried job first failed, per group: a redelivery
    carries no new header, and the retry budget counts from the first failure."""

    @model_validator(mode="after")
    def _heartbeat_below_ack_wait(self) -> Self:
        if self.progress_interval_s is not None and self.progress_interval_s >= self.ack_wait_s:
            msg = "progress_interval_s must be below ack_wait_s, or the ack wait runs out first"
            raise ValueError(msg)
        return self

    @property
    def heartbeat_s(self) -> float:
        return self.progress_interval_s or self.ack_wait_s / 3

    def dead_letter_stream_for(self, stream: str) -> str:
        return self.dead_letter_stream or f"{stream}_DLQ"

    def dead_letter_subject(self, subject: str) -> str:
        return f"{self.dead_letter_prefix}{subject}"


class StatusSettings(_Frozen):
    """Where job states (and cancellation requests) are kept, shared by workers and ingress."""

    backend: Literal["none", "memory", "redis"] = "none"
    """`redis` for real deployments; `memory` is per process; `none` records nothing (and
    then cancellation and `Idempotency-Key` need a store: the ingress refuses to start)."""
    url: SecretStr | None = None
    """Redis URL (`redis://host:6379/0`; TLS: `rediss://host:6380/0?ssl_ca_certs=/ca.pem`)."""
    password_file: Path | None = None
    """A file holding the Redis password (a mounted Secret), put into `url` at connect
    time, so the URL itself holds none."""
    namespace: str = "jobstream"
    """Key prefix, to share one Redis safely."""
    retention_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    """A job's status expires this long after its last change."""
    cancel_poll_s: float = Field(default=1.0, gt=0)
    """How often a worker checks whether its running jobs were cancelled."""

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, url: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        schemes = _URL_SCHEMES["redis"]
        if url is None or info.data.get("backend") != "redis":
            return url
        if not url.get_secret_value().startswith(schemes):
            msg = f"the redis status store needs a URL starting with {_one_of(schemes)}"
            raise ValueError(msg)
        return url

    @model_validator(mode="after")
    def _url_for_redis(self) -> Self:
        if self.backend == "redis" and self.url is None:
            msg = "status backend 'redis' needs a URL: set JOBSTREAM_STATUS__URL"
            raise ValueError(msg)
        return self


class IngressSettings(_Frozen):
    """The HTTP ingress (`jobstream ingress`)."""

    host: str = "127.0.0.1"
    """Address to bind; in a container set 0.0.0.0."""
    port: int = Field(default=8000, ge=1, le=65535)
    """Port of the HTTP API (`/v1/...`, `/livez`, `/readyz`, `/docs`)."""
    max_in_flight: int = Field(default=256, ge=1)
    """Requests publishing at once; beyond it the ingress answers 503 with Retry-After."""
    max_body_bytes: int = Field(default=1024 * 1024, ge=1)
    """Largest request body; larger ones get 413."""
    body_timeout_s: float = Field(default=30.0, gt=0)
    """Longest a request body may take to arrive once its slot is taken; a slower client
    gets 408 and frees the slot (a trickling upload cannot hold `max_in_flight` slots)."""
    retry_after_s: int = Field(default=5, ge=1)
    """Retry-After (seconds) sent with 503 answers."""
    auth_token: SecretStr | None = None
    """When set, every `/v1` request needs `Authorization: Bearer <token>` (compared in
    constant time). Or `auth_token_file`."""
    auth_token_file: Path | None = None
    """A file holding the token (a mounted Kubernetes Secret; one trailing newline is
    ignored), read at start; it replaces `auth_token`."""
    cors_origins: list[str] = Field(default_factory=list)
    """Origins (`https://app.example.com`) whose browser pages may call `/v1` (CORS).
    Empty (the default): no CORS headers, browsers keep other sites' pages out."""

    @model_validator(mode="after")
    def _token_from_file(self) -> Self:
        if self.auth_token_file is None:
            _not_empty(self.auth_token, "ingress.auth_token")
            return self
        text = read_secret_file(self.auth_token_file, "ingress.auth_token_file")
        object.__setattr__(self, "auth_token", SecretStr(text))
        _not_empty(self.auth_token, "ingress.auth_token_file")
        return self


def _not_empty(token: SecretStr | None, setting: str) -> None:
    """An empty token would turn the API's auth off (or let an empty one in): refused."""
    if token is not None and not token.get_secret_value().strip():
        msg = f"{setting} is empty: give a token, or unset it to run without auth"
        raise ValueError(msg)


class UiSettings(_Frozen):
    """The on-call dashboard at `/ui` (docs/dashboard.md), served by the ingress and by
    `jobstream ui`. It signs in with `ingress.auth_token` when that is set."""

    enabled: bool = True
    """Serve `/ui` from `jobstream ingress` (`jobstream ui` serves it regardless)."""
    read_only: bool = False
    """Hide the cancel and replay actions and refuse them (403): a dashboard to look, not
    to act."""
    jaeger_url: str | None = None
    """Base URL of the Jaeger UI (e.g. `http://127.0.0.1:16686`): a job's page links to
    `<jaeger_url>/trace/<trace id>`. None: the trace id is shown without a link."""
    page_size: int = Field(default=50, ge=1, le=500)
    """Jobs per page of the job list."""
    max_dead_letters: int = Field(default=200, ge=1, le=5000)
    """Most dead letters a page lists and a filtered replay takes (the newest)."""
    htmx_file: str | None = None
    """The htmx file served at `/ui/static/htmx.min.js` (never a CDN). Default:
    `.cache/htmx/htmx-2.0.11.min.js`, as `make htmx` (`scripts/htmx.sh`) puts it; without
    it the pages work but do not refresh by themselves."""


class HealthSettings(_Frozen):
    """The liveness / readiness HTTP endpoint."""

    host: str = "127.0.0.1"
    """Address to bind; in a container set 0.0.0.0 so the kubelet can reach it."""
    port: int = Field(default=8080, ge=0, le=65535)
    """Port of `/livez`, `/readyz` (and `/metrics`); 0 turns the endpoint off."""
    readiness_silence_s: float | None = Field(default=None, gt=0)
    """`/readyz` answers 503 once the broker has not answered for this long (Kafka: no
    fetch response, heartbeat or commit; NATS: no pull answer or ack confirmation), 200
    again at its next answer. Default: two thirds of `worker.session_timeout_s` (20 s)."""
    liveness_silence_s: float | None = Field(default=None, gt=0)
    """`/livez` answers 503 (the kubelet restarts the worker) once the broker has not
    answered, or the worker's fetch loop has not turned, for this long. Default:
    `worker.max_poll_interval_s` (300 s), when Kafka takes a member for stuck."""


class CronSettings(_Frozen):
    """How the replicas of an app share its cron schedules (docs/scheduling.md#cron)."""

    lease_s: float = Field(default=10.0, ge=0.1, le=300.0)
    """The leading replica's lease in the idempotency store, renewed every third of it.
    Another replica takes the lead once it saw the lease unchanged for this long, so a
    leader that dies is replaced within about 1.4 leases."""
    grace_s: float = Field(default=30.0, gt=0, le=86_400.0)
    """A tick not yet published is still published this long after its time (a leader
    died at the tick, the store or broker was away); older ones are missed, skipped unless
    the schedule's `catch_up` says otherwise. At least twice `lease_s`, so a tick lost by a
    dying leader is always within it."""

    @model_validator(mode="after")
    def _grace_covers_a_failover(self) -> Self:
        if self.grace_s < 2 * self.lease_s:
            msg = (
                f"cron.grace_s ({self.grace_s:g}) must be at least twice cron.lease_s "
                f"({self.lease_s:g}): a tick due while a leader dies must still be published"
            )
            raise ValueError(msg)
        return self


class LoggingSettings(_Frozen):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of the `jobstream` loggers."""
    format: Literal["json", "text"] = "json"
    """`json`: one JSON object per line (for log pipelines); `text`: for people."""


class TelemetrySettings(_Frozen):
    """What the standard OTEL_* variables cannot say (docs/observability.md lists those)."""

    attempt_parent: Literal["producer", "none"] = "producer"
    """Parent of each processing span: `producer`, the span that published the record (the
    request, the job and its retries form one trace); `none`, a new trace per attempt,
    joined to the others by span links only. Either way a processing span links to the
    job's origin and, on a retry, to the previous attempt."""


class Settings(ProducerSettings):
    """Everything a worker needs."""

    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    idempotency: IdempotencySettings = Field(default_factory=IdempotencySettings)
    cron: CronSettings = Field(default_factory=CronSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    jetstream: JetStreamSettings = Field(default_factory=JetStreamSettings)
    """NATS JetStream consumption (`JOBSTREAM_JETSTREAM__*`)."""
    status: StatusSettings = Field(default_factory=StatusSettings)
    ingress: IngressSettings = Field(default_factory=IngressSettings)
    ui: UiSettings = Field(default_factory=UiSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
