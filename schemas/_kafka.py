"""The CloudEvents Kafka protocol binding, binary content mode: attributes as `ce_` headers,
`content-type` for the data content type, the record key for the ordering key
(`partitionkey`), W3C `traceparent`/`tracestate` as plain headers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from schemas._attributes import (
    JobAttributes,
    ce_pairs,
    check_size,
    collect,
    header_name,
    parse,
    text,
)
from schemas.names import KAFKA_CONTENT_TYPE, KAFKA_PREFIX, TRACEPARENT, TRACESTATE

__all__ = ["foreign_headers", "from_kafka", "kafka_size", "to_kafka", "to_kafka_unchecked"]

_BINDING_HEADERS = frozenset({KAFKA_CONTENT_TYPE, TRACEPARENT, TRACESTATE})


def to_kafka(attrs: JobAttributes) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """(record key, headers) in the CloudEvents Kafka binding, binary content mode."""
    key, headers = to_kafka_unchecked(attrs)
    check_size(attrs, kafka_size(key, headers))
    return key, headers


def from_kafka(key: bytes | None, headers: Sequence[tuple[str, bytes | None]]) -> JobAttributes:
    """Attributes from a Kafka record's key and headers; `InvalidAttributes` if untrusted."""
    ce, plain = collect(((n, v) for n, v in headers if v is not None), KAFKA_PREFIX)
    # An empty record key is no key: Kafka partitions both the same way (no ordering).
    return parse(ce, plain, KAFKA_PREFIX, text("the record key", key) if key else None)


def to_kafka_unchecked(attrs: JobAttributes) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    headers = [
        (header_name(name, KAFKA_PREFIX, KAFKA_CONTENT_TYPE), value.encode())
        for name, value in ce_pairs(attrs)
    ]
    return (attrs.key.encode() if attrs.key is not None else None), headers


def kafka_size(key: bytes | None, headers: Iterable[tuple[str, bytes]]) -> int:
    return len(key or b"") + sum(len(n.encode()) + len(v) for n, v in headers)


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
