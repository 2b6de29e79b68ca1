"""Errors raised while publishing jobs.

    JobstreamError (schemas)            root of every error jobstream raises
     └── PublishError                   publish-error: the broker refused or failed a publish
          ├── BrokerUnavailable         broker-unavailable (retriable): cannot reach the broker
          ├── BrokerRefused             broker-refused: the broker (or its certificate) refused
          │                              the connection: credentials, CA or host name; the
          │                              message names the setting to fix
          ├── BrokerBusy                broker-busy (retriable): the broker cannot take the
          │                              record right now (leader election, throttling)
          ├── PublishTimeout            publish-timeout (retriable): no acknowledgement in time
          ├── RecordTooLarge            record-too-large: over the broker's size limit
          ├── DestinationMissing        destination-missing: the topic or stream does not
          │                              exist; run `jobstream topics ensure`
          ├── SpoolFull                 spool-full (retriable): the broker could not take
          │                              the job and the spool is at its bound
          ├── UniqueStoreUnavailable    unique-store-unavailable (retriable): the store of
          │                              unique keys did not answer; nothing was published
          └── UniqueKeyBusy             unique-key-busy (retriable): another publish held
                                         the unique key for longer than it may
     SpoolLocked                        spool-locked: other processes own every slot file
     NotASpool                          not-a-spool: the spool path is something else

`job_id`: an error raised by `JobProducer.publish` carries the id of the job it was
publishing (None when raised elsewhere, e.g. by `publish_many`), so an ambiguous
`PublishTimeout` keeps the id to publish it again under.

`retriable` is the classification the worker acts on: a retriable (transient) error is
retried with backoff, any other (permanent) error changes course (a retry record that is
refused dead-letters the job; a dead letter that is too large is stored reduced; see
docs/failure-handling.md). A plain `PublishError` is permanent.

A payload that fails validation raises `schemas.InvalidPayload` before anything is sent.

Every message names the transport and the address or destination, and says what to do.
`PublishTimeout` means the outcome is unknown: the job may have been stored. Publishing it
again with the same id is safe (JetStream drops the repeat within its duplicate window;
workers skip a job id that already completed).
"""

from __future__ import annotations

from typing import Any

from schemas import JobstreamError

__all__ = [
    "BrokerBusy",
    "BrokerRefused",
    "BrokerUnavailable",
    "DestinationMissing",
    "NotASpool",
    "PublishError",
    "PublishTimeout",
    "RecordTooLarge",
    "SpoolFull",
    "SpoolLocked",
    "UniqueKeyBusy",
    "UniqueStoreUnavailable",
]


class PublishError(JobstreamError):
    """A publish failed. Root of the producer's errors."""

    retriable = False
    reason = "publish-error"
    job_id: str | None = None
    """The id of the job `JobProducer.publish` was publishing (set by it), else None."""


_ADDRESS_SETTING = {
    "kafka": "JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS",
    "nats": "JOBSTREAM_NATS__SERVERS",
}


class BrokerUnavailable(PublishError):
    """The broker cannot be reached (at start, or while the connection is down)."""

    retriable = True
    reason = "broker-unavailable"

    def __init__(self, transport: str, address: str, detail: str) -> None:
        self.transport = transport
        self.address = address
        self.detail = detail
        setting = _ADDRESS_SETTING.get(transport, "the broker address setting")
        super().__init__(
            f"{transport} is not reachable at {address} ({detail}); check that the broker "
            f"runs and that {setting} and the credentials are right (locally: `make up`)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.transport, self.address, self.detail))


class BrokerRefused(PublishError):
    """The broker was reached, but the connection was refused for a reason that no retry
    cures: credentials the broker rejected, a certificate the client does not trust, a
    certificate that does not name the host connected to (docs/security.md). Permanent:
    a worker or CLI stops at once with this one line."""

    reason = "broker-refused"

    def __init__(self, transport: str, address: str, detail: str) -> None:
        self.transport = transport
        self.address = address
        self.detail = detail
        super().__init__(f"{transport} at {address} refused the connection: {detail}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.transport, self.address, self.detail))


class BrokerBusy(PublishError):
    """The broker is reachable but cannot take the record right now (a retriable broker
    error: no leader for the partition, throttling, JetStream temporarily unavailable)."""

    retriable = True
    reason = "broker-busy"

    def __init__(self, transport: str, destination: str, detail: str) -> None:
        self.transport = transport
        self.destination = destination
        self.detail = detail
        super().__init__(
            f"{transport} could not take the publish to {destination!r} right now ({detail}); "
            "it is retried with backoff; if it persists, check the broker's health"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.transport, self.destination, self.detail))


class RecordTooLarge(PublishError):
    """The broker refuses the record for its size (Kafka `MessageSizeTooLargeError`,
    NATS max payload or a stream's max message size). Retrying cannot help."""

    reason = "record-too-large"

    def __init__(self, transport: str, destination: str, detail: str) -> None:
        self.transport = transport
        self.destination = destination
        self.detail = detail
        super().__init__(
            f"{transport}: the record to {destination!r} is over the broker's size limit "
            f"({detail}); keep jobs small (pass large data by reference) or raise the limit"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.transport, self.destination, self.detail))


class PublishTimeout(PublishError):
    """The broker did not acknowledge a publish within `publish_timeout_s`."""

    retriable = True
    reason = "publish-timeout"

    def __init__(self, transport: str, destination: str, timeout_s: float) -> None:
        self.transport = transport
        self.destination = destination
        self.timeout_s = timeout_s
        super().__init__(
            f"{transport} did not acknowledge the publish to {destination!r} within "
            f"{timeout_s:g}s; the job may or may not be stored: check the broker, then publish "
            "again with the same job id (repeats are deduplicated by id)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.transport, self.destination, self.timeout_s))


class DestinationMissing(PublishError):
    """The topic (Kafka) or the stream capturing the subject (NATS) does not exist.
    `destination` names one, or several separated by ", "."""

    reason = "destination-missing"

    def __init__(self, transport: str, destination: str) -> None:
        self.transport = transport
        self.destination = destination
        several = ", " in destination  # `check` names every missing destination at once
        names = destination if several else repr(destination)
        if transport == "nats":
            noun = "subjects" if several else "subject"
            what = f"no JetStream stream captures {noun} {names} (is JetStream on?)"
        else:
            what = f"topics {names} do not exist" if several else f"topic {names} does not exist"
        super().__init__(
            f"{transport}: {what}; create it with `jobstream topics ensure` "
            "(or set JOBSTREAM_CREATE_MISSING=true to create it on first publish, in "
            "development only)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.transport, self.destination))


class SpoolFull(PublishError):
    """The broker could not take a job (the error is the `__cause__`, if any) and the spool
    holds `spool.max_jobs` jobs or `spool.max_bytes` bytes already: nothing was stored."""

    retriable = True
    reason = "spool-full"

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(
            f"the spool {path} is full ({detail}) and the broker cannot take the job; wait "
            "for the broker (the spool drains by itself) or raise JOBSTREAM_SPOOL__MAX_JOBS / "
            "JOBSTREAM_SPOOL__MAX_BYTES"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.detail))


class UniqueStoreUnavailable(PublishError):
    """The store of unique keys (`unique.url`) did not answer within `unique.timeout_s`, or
    refused the connection. Raised before anything is published: publishing again is safe."""

    retriable = True
    reason = "unique-store-unavailable"

    def __init__(self, address: str, detail: str) -> None:
        self.address = address
        self.detail = detail
        super().__init__(
            f"the unique-key store at {address} is not reachable ({detail}); nothing was "
            "published: publish again once it is back, and check that it runs and that "
            "JOBSTREAM_UNIQUE__URL is right (locally: `make up`)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.address, self.detail))


class UniqueKeyBusy(PublishError):
    """Another publish held the unique key (publishing its job) for longer than twice
    `unique.lease_s` while this one waited. Nothing was published by this call."""

    retriable = True
    reason = "unique-key-busy"

    def __init__(self, unique_key: str, waited_s: float) -> None:
        self.unique_key = unique_key
        self.waited_s = waited_s
        super().__init__(
            f"unique key {unique_key!r} stayed reserved by another publish for {waited_s:g}s; "
            "publish again later (its job, if published, is returned then), or raise "
            "JOBSTREAM_UNIQUE__LEASE_S above the broker's publish timeout"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.unique_key, self.waited_s))


class SpoolLocked(JobstreamError):
    """Every slot file of the spool path is owned by another process (or, for one slot
    file, that one is)."""

    retriable = False
    reason = "spool-locked"

    def __init__(self, path: str, slots: int = 1) -> None:
        self.path = path
        self.slots = slots
        if slots > 1:
            what = (
                f"all {slots} slots of the spool {path} ({path}, {path}.1, ...) are in use by "
                "other processes; raise JOBSTREAM_SPOOL__MAX_PROCESSES (spool.max_processes) "
                "or stop one of them"
            )
        else:
            what = (
                f"the spool {path} is in use by another process; stop it, or let that "
                "process publish what the spool holds"
            )
        super().__init__(what)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.slots))


class NotASpool(JobstreamError):
    """The spool path names something that is not a jobstream spool (a directory, a text
    file, another application's SQLite database): it is left untouched."""

    retriable = False
    reason = "not-a-spool"

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(
            f"{path} is not a jobstream spool ({detail}); point JOBSTREAM_SPOOL__PATH "
            "(or --path) at a file of its own, e.g. /var/lib/<app>/spool.db"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.detail))
