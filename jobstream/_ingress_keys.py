"""What the ingress checks and derives before it reserves an `Idempotency-Key`.

- `fingerprint`: the request a key is bound to (IETF draft-ietf-httpapi-idempotency-key-header,
  "Idempotency Fingerprint"): SHA-256 over the job type, the resolved version, the `?key=`,
  the raw body bytes and the `?delay=`/`?not_before=` as given (normalized). The same key
  with another fingerprint is answered 422.
- `binding_name`: where the binding lives in the status store: per job type, the key hashed
  (any length of header costs 64 hex digits in Redis).
- `check_attributes`: the job's attributes as the wire codec will encode them, so a `?key=`
  over the header limit (`schemas.MAX_HEADER_BYTES`, 16 KiB for a record's key and headers)
  is a 400 before anything is reserved or published.
- `publish_bound_s`, `lease_s`: how long one publish may take (connecting included), and
  the reservation's lease: that plus `LEASE_MARGIN_S` for the status writes around it.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from consumer import Settings
from producer.tracecontext import current_trace_headers
from schemas import MAX_HEADER_BYTES, InvalidAttributes, Job, encode, header_bytes

__all__ = [
    "LEASE_MARGIN_S",
    "binding_name",
    "check_attributes",
    "fingerprint",
    "lease_s",
    "publish_bound_s",
]

LEASE_MARGIN_S = 5.0
"""Seconds a reservation outlives the publish bound: the status writes that settle it, and
the clock skew tolerated between ingress replicas."""


def fingerprint(
    job_type: str, version: int, key: str | None, body: bytes, schedule: str | None = None
) -> str:
    """Hex SHA-256 of the request's job type, version, `?key=` (absent and empty differ),
    body and `schedule` (`Schedule.canonical`); each part length-prefixed, so no two
    requests share one by concatenation. Without a schedule the digest is the one of
    earlier versions, so bindings made before an upgrade keep their fingerprint."""
    digest = hashlib.sha256()
    parts = [job_type.encode(), str(version).encode(), key, body]
    if schedule is not None:
        parts.append(schedule)
    for part in parts:
        if part is None:
            digest.update(b"-")
            continue
        data = part.encode() if isinstance(part, str) else part
        digest.update(f"{len(data)}:".encode())
        digest.update(data)
    return digest.hexdigest()


def binding_name(job_type: str, idempotency_key: str) -> str:
    """`<job type>:<sha256 of the key>`: the binding's name in the status store."""
    return f"{job_type}:{hashlib.sha256(idempotency_key.encode()).hexdigest()}"


def check_attributes(
    job: Job, *, key: str | None, job_id: str, source: str, not_before: datetime | None = None
) -> None:
    """Raise `InvalidAttributes` (the publish's own error) if `job` with ordering key `key`
    cannot be encoded: an empty key, control characters, or headers over
    `MAX_HEADER_BYTES` (the current trace context counted as the publish will add it)."""
    traceparent, tracestate = current_trace_headers()
    message = encode(
        job,
        source=source,
        id=job_id,
        key=key,
        not_before=not_before,
        traceparent=traceparent,
        tracestate=tracestate,
    )
    size = header_bytes(message.attributes)
    if size > MAX_HEADER_BYTES:
        key_bytes = len(key.encode()) if key else 0
        msg = (
            f"the record's key and headers would take {size} bytes, over the limit of "
            f"{MAX_HEADER_BYTES} bytes; the ?key= (the ordering key) is {key_bytes} bytes: "
            "use a short ordering key (an id, not data)"
        )
        raise InvalidAttributes(msg)


def publish_bound_s(settings: Settings) -> float:
    """Longest one publish may take, connecting included: the larger connect plus publish
    timeout of Kafka and NATS (whichever transport is configured, the bound is safe)."""
    kafka, nats = settings.kafka, settings.nats
    return max(
        kafka.connect_timeout_s + kafka.publish_timeout_s,
        nats.connect_timeout_s + nats.publish_timeout_s,
    )


def lease_s(settings: Settings) -> float:
    """A reservation's lease: `publish_bound_s` plus `LEASE_MARGIN_S`."""
    return publish_bound_s(settings) + LEASE_MARGIN_S
