"""The CloudEvents NATS protocol binding, binary content mode: attributes as `ce-` headers,
`Content-Type`, the ordering key as `ce-partitionkey`, and `Nats-Msg-Id` = the job id so
JetStream drops a repeated publish within its duplicate window."""

from __future__ import annotations

from collections.abc import Mapping

from schemas._attributes import JobAttributes, ce_pairs, check_size, collect, header_name, parse
from schemas.names import NATS_CONTENT_TYPE, NATS_MSG_ID, NATS_PREFIX, PARTITIONKEY

__all__ = ["from_nats", "nats_size", "to_nats", "to_nats_unchecked"]


def to_nats(attrs: JobAttributes) -> dict[str, str]:
    """Message headers in the CloudEvents NATS binding, binary content mode."""
    headers = to_nats_unchecked(attrs)
    check_size(attrs, nats_size(headers))
    return headers


def from_nats(headers: Mapping[str, str] | None) -> JobAttributes:
    """Attributes from NATS message headers (names matched case-insensitively)."""
    ce, plain = collect((headers or {}).items(), NATS_PREFIX)
    return parse(ce, plain, NATS_PREFIX, None)


def to_nats_unchecked(attrs: JobAttributes) -> dict[str, str]:
    headers = {
        header_name(name, NATS_PREFIX, NATS_CONTENT_TYPE): value for name, value in ce_pairs(attrs)
    }
    if attrs.key is not None:
        headers[NATS_PREFIX + PARTITIONKEY] = attrs.key
    headers[NATS_MSG_ID] = attrs.id  # JetStream drops a repeated publish within its window
    return headers


def nats_size(headers: Mapping[str, str]) -> int:
    return sum(len(n.encode()) + len(v.encode()) for n, v in headers.items())
