"""Typed jobs to wire messages and back: `encode`, `decode`, `validate_payload`.

A `JobMessage` is what travels: `JobAttributes` (headers) and a body of UTF-8 JSON. The
transport-specific header layout lives in `_attributes`; this module owns the body.

Guarantees:

- `decode(encode(job, ...), registry).job == job` for every registered model whose fields
  survive a JSON round trip; the attributes come back equal too.
- `decode` is strict: pydantic strict mode on JSON input, so `"42"` is not an int and
  `1` is not a bool, and unknown fields are rejected. The model is chosen by
  (`ce_type`, `ce_jobversion`) alone, never guessed from the body.
- `decode` and `validate_payload` raise only `JobDecodeError` subclasses for bad input,
  each naming what is wrong: `UnknownJobType`, `UnsupportedVersion`, `UndecodableBody`
  (not a UTF-8 JSON object, or a non-JSON content type), `InvalidPayload` (fields).
- `validate_payload` accepts exactly what a consumer's `decode` will accept, so a payload
  checked before publishing cannot be dead-lettered for its shape.
- No I/O. `encode` reads the clock and the system's random source (`os.urandom`, as
  `uuid.uuid4` does) only when `time` or `id` are not given.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import pydantic

from schemas._attributes import JobAttributes
from schemas._errors import InvalidPayload, UndecodableBody
from schemas._job import Job, is_concrete
from schemas._kafka import kafka_headers
from schemas._nats import nats_headers
from schemas._registry import JobRegistry
from schemas.names import JSON

__all__ = [
    "DecodedJob",
    "JobMessage",
    "decode",
    "encode",
    "new_id",
    "now_utc",
    "schema_urn",
    "validate_payload",
]

J = TypeVar("J", bound=Job)


@dataclasses.dataclass(frozen=True, slots=True)
class JobMessage:
    """One job on the wire, independent of the transport."""

    attributes: JobAttributes
    """CloudEvents attributes; `to_kafka`/`to_nats` turn them into headers."""
    body: bytes
    """The payload as UTF-8 JSON (the Kafka record value, the NATS message data)."""


@dataclasses.dataclass(frozen=True, slots=True)
class DecodedJob:
    """A validated job and the attributes it arrived with."""

    job: Job
    """The payload as an instance of the model registered for (type, version)."""
    attributes: JobAttributes
    """The attributes of the record, unchanged."""


def now_utc() -> datetime:
    """The current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


# The hex digit that starts the fourth group of a version 4 UUID: variant bits `10`.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def new_id() -> str:
    """A fresh job id: a random (version 4) UUID as text, as `str(uuid.uuid4())` gives it
    (the same 122 bits from `os.urandom`), at a third of the cost."""
    digits = os.urandom(16).hex()
    return (
        f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-"
        f"{_VARIANT[digits[16]]}{digits[17:20]}-{digits[20:]}"
    )


def schema_urn(job_type: str, version: int) -> str:
    """The `dataschema` attribute and JSON Schema `$id` of a job type's version."""
    return f"urn:jobstream:schema:{job_type}:v{version}"


def encode(
    job: Job,
    *,
    source: str,
    id: str | None = None,  # named after the CloudEvents attribute, shadowing is fine
    key: str | None = None,
    time: datetime | None = None,
    idempotency_key: str | None = None,
    not_before: datetime | None = None,
    subject: str | None = None,
    traceparent: str | None = None,
    tracestate: str | None = None,
    origin_traceparent: str | None = None,
    origin_tracestate: str | None = None,
) -> JobMessage:
    """The message for the first publish of `job`.

    `id` defaults to a random UUID and `time` to now. The origin trace context defaults
    to `traceparent`/`tracestate`: on the first publish, the current trace *is* the origin,
    and retries keep it while their own `traceparent` changes.
    """
    model = type(job)
    if not is_concrete(model):
        msg = f"{model.__qualname__} has no job type; declare it with type= and version="
        raise TypeError(msg)
    if origin_traceparent is None:
        origin_traceparent, origin_tracestate = traceparent, tracestate
    job_type, version = model.job_type, model.job_version
    # Positional, in field order (id, type, source, time, version, subject, dataschema,
    # content_type, key, attempt, idempotency_key, not_before, traceparent, tracestate,
    # origin_traceparent, origin_tracestate): a tenth of `encode` cheaper than keywords,
    # and a unit test checks that each option lands in its attribute.
    attributes = JobAttributes(
        new_id() if id is None else id,
        job_type,
        source,
        datetime.now(UTC) if time is None else time,
        version,
        subject,
        schema_urn(job_type, version),
        JSON,
        key,
        1,
        idempotency_key,
        not_before,
        traceparent,
        tracestate,
        origin_traceparent,
        origin_tracestate,
    )
    # by_alias: the JSON Schema and validation speak the field aliases, so the body must too.
    # (`model_dump_json` is this call, decoded to text: the bytes are what travels.)
    return JobMessage(attributes, model.__pydantic_serializer__.to_json(job, by_alias=True))


def decode(message: JobMessage, registry: JobRegistry) -> DecodedJob:
    """The typed job in `message`, validated strictly by the model for (type, version)."""
    attributes = message.attributes
    model = registry.resolve(attributes.type, attributes.version)
    if not _is_json(attributes.content_type):
        raise UndecodableBody(
            f"{_label(model)}: content type {attributes.content_type!r} is not JSON; "
            "publish job payloads as application/json"
        )
    return DecodedJob(_validate(model, message.body), attributes)


def validate_payload(model: type[J], data: Mapping[str, Any] | str | bytes) -> J:
    """`data` (a JSON text, or a mapping of JSON values) as a `model`, validated as
    `decode` would; raises `InvalidPayload` naming the fields, or `UndecodableBody`."""
    if isinstance(data, Mapping):
        try:
            data = json.dumps(dict(data), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise UndecodableBody(
                f"{_label(model)}: payload is not JSON-serializable ({exc}); "
                "pass JSON values only, or build the model instance directly"
            ) from exc
    return _validate(model, data)


def _validate(model: type[J], body: str | bytes) -> J:
    # The label is built only on failure: this runs for every job a worker takes.
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UndecodableBody(
                f"{_label(model)}: body is not UTF-8 (invalid byte at offset {exc.start}); "
                "publish the payload as UTF-8 JSON"
            ) from None
    try:
        return model.model_validate_json(body, strict=True)
    except pydantic.ValidationError as exc:
        label = _label(model)
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        if any(error["type"] == "json_invalid" for error in errors):
            raise UndecodableBody(
                f"{label}: body is not valid JSON ({errors[0]['msg']}); "
                "publish the payload as a JSON object"
            ) from exc
        if [(e["type"], e["loc"]) for e in errors] == [("model_type", ())]:
            raise UndecodableBody(
                f"{label}: body is JSON but not an object; a job payload is a JSON object"
            ) from exc
        raise InvalidPayload(label, errors) from exc


def _label(model: type[Job]) -> str:
    return f"{model.job_type} v{model.job_version}" if is_concrete(model) else model.__qualname__


def _is_json(content_type: str) -> bool:
    if content_type == JSON:  # what jobstream writes
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def header_bytes(attrs: JobAttributes) -> int:
    """Bytes `attrs` take on the wire: the larger of the Kafka and the NATS encoding."""
    return max(kafka_headers(attrs)[2], nats_headers(attrs)[1])
