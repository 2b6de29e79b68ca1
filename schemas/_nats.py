"""The CloudEvents NATS protocol binding, binary content mode: attributes as `ce-` headers,
`Content-Type`, the ordering key as `ce-partitionkey`, and `Nats-Msg-Id` = the job id so
JetStream drops a repeated publish within its duplicate window."""

from __future__ import annotations

from collections.abc import Mapping
from itertools import chain

from schemas._attributes import MAX_HEADER_BYTES, JobAttributes, format_time
from schemas._headers import collect, decimal, header_names, known_names, read, too_large
from schemas.names import (
    NATS_CONTENT_TYPE,
    NATS_MSG_ID,
    NATS_PREFIX,
    PARTITIONKEY,
    SPECVERSION,
    TRACEPARENT,
    TRACESTATE,
)

__all__ = ["from_nats", "nats_headers", "to_nats"]

(
    _SPECVERSION,
    _ID,
    _TYPE,
    _SOURCE,
    _TIME,
    _SUBJECT,
    _DATASCHEMA,
    _,
    _,
    _,
    _VERSION,
    _ATTEMPT,
    _IDEMKEY,
    _NOTBEFORE,
    _ORIGIN,
    _ORIGINSTATE,
) = header_names(NATS_PREFIX, NATS_CONTENT_TYPE)
_PARTITIONKEY = NATS_PREFIX + PARTITIONKEY
# The `ce-` names as jobstream writes them: read without lowercasing (`collect`).
_KNOWN = known_names(NATS_PREFIX)


def to_nats(attrs: JobAttributes) -> dict[str, str]:
    """Message headers in the CloudEvents NATS binding, binary content mode."""
    headers, size = nats_headers(attrs)
    if size > MAX_HEADER_BYTES:
        raise too_large(attrs, size)
    return headers


def from_nats(headers: Mapping[str, str] | None) -> JobAttributes:
    """Attributes from NATS message headers (names matched case-insensitively)."""
    ce, plain = collect((headers or {}).items(), NATS_PREFIX, _KNOWN)
    return read(ce, plain, NATS_PREFIX, None)


def nats_headers(attrs: JobAttributes) -> tuple[dict[str, str], int]:
    """(headers, their size in UTF-8 bytes), without the size check.

    Written out field by field in wire order (`_headers.wire_values`), as `kafka_headers`."""
    headers = {
        _SPECVERSION: SPECVERSION,
        _ID: attrs.id,
        _TYPE: attrs.type,
        _SOURCE: attrs.source,
        _TIME: format_time(attrs.time),
    }
    if attrs.subject is not None:
        headers[_SUBJECT] = attrs.subject
    if attrs.dataschema is not None:
        headers[_DATASCHEMA] = attrs.dataschema
    headers[NATS_CONTENT_TYPE] = attrs.content_type
    if attrs.traceparent is not None:
        headers[TRACEPARENT] = attrs.traceparent
    if attrs.tracestate is not None:
        headers[TRACESTATE] = attrs.tracestate
    headers[_VERSION] = decimal(attrs.version)
    headers[_ATTEMPT] = decimal(attrs.attempt)
    if attrs.idempotency_key is not None:
        headers[_IDEMKEY] = attrs.idempotency_key
    if attrs.not_before is not None:
        headers[_NOTBEFORE] = format_time(attrs.not_before)
    if attrs.origin_traceparent is not None:
        headers[_ORIGIN] = attrs.origin_traceparent
    if attrs.origin_tracestate is not None:
        headers[_ORIGINSTATE] = attrs.origin_tracestate
    for name, value in attrs.extensions.items():
        headers[NATS_PREFIX + name] = value
    if attrs.key is not None:
        headers[_PARTITIONKEY] = attrs.key
    headers[NATS_MSG_ID] = attrs.id  # JetStream drops a repeated publish within its window
    # Every name and value in one string: its length is its size when it is ASCII.
    joined = "".join(chain.from_iterable(headers.items()))
    return headers, len(joined) if joined.isascii() else len(joined.encode())
