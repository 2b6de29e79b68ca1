"""The CloudEvents Kafka protocol binding, binary content mode: attributes as `ce_` headers,
`content-type` for the data content type, the record key for the ordering key
(`partitionkey`), W3C `traceparent`/`tracestate` as plain headers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import chain

from schemas._attributes import MAX_HEADER_BYTES, JobAttributes, format_time
from schemas._headers import (
    collect,
    decimal,
    header_names,
    known_names,
    read,
    text,
    too_large,
)
from schemas.names import (
    KAFKA_CONTENT_TYPE,
    KAFKA_PREFIX,
    SPECVERSION,
    TRACEPARENT,
    TRACESTATE,
)

__all__ = ["foreign_headers", "from_kafka", "kafka_headers", "to_kafka"]

_BINDING_HEADERS = frozenset({KAFKA_CONTENT_TYPE, TRACEPARENT, TRACESTATE})
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
) = header_names(KAFKA_PREFIX, KAFKA_CONTENT_TYPE)
SPECVERSION_BYTES = SPECVERSION.encode()
# The `ce_` names as jobstream writes them: read without lowercasing (`collect`).
_KNOWN = known_names(KAFKA_PREFIX)


def to_kafka(attrs: JobAttributes) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """(record key, headers) in the CloudEvents Kafka binding, binary content mode."""
    key, headers, size = kafka_headers(attrs)
    if size > MAX_HEADER_BYTES:
        raise too_large(attrs, size)
    return key, headers


def from_kafka(key: bytes | None, headers: Sequence[tuple[str, bytes | None]]) -> JobAttributes:
    """Attributes from a Kafka record's key and headers; `InvalidAttributes` if untrusted."""
    ce, plain = collect(headers, KAFKA_PREFIX, _KNOWN)
    # An empty record key is no key: Kafka partitions both the same way (no ordering).
    return read(ce, plain, KAFKA_PREFIX, text("the record key", key) if key else None)


def kafka_headers(attrs: JobAttributes) -> tuple[bytes | None, list[tuple[str, bytes]], int]:
    """(record key, headers, their size in bytes with the key's), without the size check.

    Written out field by field in wire order (`_headers.wire_values`, which the size error
    and the tests use): this runs for every record published, and a loop over the fields
    costs a third more."""
    headers = [
        (_SPECVERSION, SPECVERSION_BYTES),
        (_ID, attrs.id.encode()),
        (_TYPE, attrs.type.encode()),
        (_SOURCE, attrs.source.encode()),
        (_TIME, format_time(attrs.time).encode()),
    ]
    if attrs.subject is not None:
        headers.append((_SUBJECT, attrs.subject.encode()))
    if attrs.dataschema is not None:
        headers.append((_DATASCHEMA, attrs.dataschema.encode()))
    headers.append((KAFKA_CONTENT_TYPE, attrs.content_type.encode()))
    if attrs.traceparent is not None:
        headers.append((TRACEPARENT, attrs.traceparent.encode()))
    if attrs.tracestate is not None:
        headers.append((TRACESTATE, attrs.tracestate.encode()))
    headers.append((_VERSION, decimal(attrs.version).encode()))
    headers.append((_ATTEMPT, decimal(attrs.attempt).encode()))
    if attrs.idempotency_key is not None:
        headers.append((_IDEMKEY, attrs.idempotency_key.encode()))
    if attrs.not_before is not None:
        headers.append((_NOTBEFORE, format_time(attrs.not_before).encode()))
    if attrs.origin_traceparent is not None:
        headers.append((_ORIGIN, attrs.origin_traceparent.encode()))
    if attrs.origin_tracestate is not None:
        headers.append((_ORIGINSTATE, attrs.origin_tracestate.encode()))
    headers += [(KAFKA_PREFIX + name, value.encode()) for name, value in attrs.extensions.items()]
    # Names are ASCII: their length is their size. (`chain`: name, value, name, value, ...)
    size = sum(map(len, chain.from_iterable(headers)))
    if attrs.key is None:
        return None, headers, size
    key = attrs.key.encode()
    return key, headers, size + len(key)


def foreign_headers(
    headers: Iterable[tuple[str, bytes | None]],
) -> list[tuple[str, bytes | None]]:
    """The headers this binding does not own (neither `ce_*`, `content-type` nor the W3C
    trace context), e.g. `x-tenant`, in order: what a re-encoded record carries over."""
    return [
        (name, value)
        for name, value in headers
        if not name.lower().startswith(KAFKA_PREFIX) and name.lower() not in _BINDING_HEADERS
    ]
