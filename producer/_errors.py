"""Errors raised while publishing jobs.

    JobstreamError (schemas)            root of every error jobstream raises
     └── PublishError                   publish-error: the broker refused or failed a publish
          ├── BrokerUnavailable         broker-unavailable (retriable): cannot reach the broker
          ├── BrokerBusy                broker-busy (retriable): the broker cannot take the
          │                              record right now (leader election, throttling)
          ├── PublishTimeout            publish-timeout (retriable): no acknowledgement in time
          ├── RecordTooLarge            record-too-large: over the broker's size limit
          └── DestinationMissing        destination-missing: the topic or stream does not
                                         exist; run `jobstream topics ensure`

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
    "BrokerUnavailable",
    "DestinationMissing",
    "PublishError",
    "PublishTimeout",
    "RecordTooLarge",
]


class PublishError(JobstreamError):
    """A publish failed. Root of the producer's errors."""

    retriable = False
    reason = "publish-error"


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
