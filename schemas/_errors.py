"""The exception tree of jobstream, rooted at `JobstreamError`.

Errors are grouped by what they cause. Every class states it with two class attributes:
`retriable` (may the same job succeed if tried again?) and `reason` (a short kebab-case
code that the failure-routing code writes into dead-letter records and metrics).

    JobstreamError                      root of every error jobstream raises
     └── JobDecodeError                 a record cannot become a typed job: dead-letter it
          ├── InvalidAttributes         invalid-attributes: missing or malformed CloudEvents
          │                              attribute (or attributes too large to send)
          ├── UndecodableBody           undecodable-body: body is not a UTF-8 JSON object
          ├── UnknownJobType            unknown-type: no model registered for ce_type
          ├── UnsupportedVersion        unsupported-version: type known, version not
          └── InvalidPayload            invalid-payload: body fails the model's validation
                                         (raised on publish too, before anything is sent)

Other packages add their own branches under `JobstreamError` (configuration, broker,
handler control flow); this module only holds the root and the decoding branch, because
`schemas` is the bottom layer that everything else imports.

Guarantees: every message says what is wrong and what to do about it; `reason` is unique
per class that defines it and matches `^[a-z0-9]+(-[a-z0-9]+)*$`; every error pickles.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

__all__ = [
    "InvalidAttributes",
    "InvalidPayload",
    "JobDecodeError",
    "JobstreamError",
    "UndecodableBody",
    "UnknownJobType",
    "UnsupportedVersion",
]

_REASON = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
# An InvalidPayload message travels in a dead-letter header, which must stay small (SPEC 2).
_MAX_LISTED_ERRORS = 5


class JobstreamError(Exception):
    """Root of every error jobstream raises. Catch this to catch them all."""

    retriable: ClassVar[bool] = False
    reason: ClassVar[str] = "error"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Checked at class creation so a typo in a subclass fails at import, not in a header.
        if not _REASON.fullmatch(cls.reason):
            msg = f"{cls.__qualname__}.reason must be kebab-case, got {cls.reason!r}"
            raise TypeError(msg)


class JobDecodeError(JobstreamError):
    """A record or payload cannot become a typed job. Retrying cannot help."""

    retriable = False
    reason = "decode-error"


class UnreadableRecord(JobDecodeError):
    """The broker's client could not parse the record (Kafka: a header name that is not
    UTF-8, a corrupt record batch): its key, body and headers are unknown, only its
    position is. Its dead letter holds no job to replay."""

    reason = "unreadable-record"


class InvalidAttributes(JobDecodeError):
    """A required CloudEvents attribute is missing or malformed, or the attributes are too
    large to travel as headers."""

    reason = "invalid-attributes"


class UndecodableBody(JobDecodeError):
    """The body is not UTF-8 JSON, or not a JSON object."""

    reason = "undecodable-body"


class UnknownJobType(JobDecodeError):
    """No model is registered for the job type (`ce_type`)."""

    reason = "unknown-type"

    def __init__(self, job_type: str, known_types: Sequence[str] = ()) -> None:
        self.job_type = job_type
        self.known_types = list(known_types)
        known = ", ".join(self.known_types) if self.known_types else "none"
        super().__init__(
            f"unknown job type {job_type!r} (registered types: {known}); import the module "
            "that declares its Job model in the worker, or fix ce_type in the producer"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.job_type, self.known_types))


class UnsupportedVersion(JobDecodeError):
    """The job type is registered, but not in the version the record carries."""

    reason = "unsupported-version"

    def __init__(self, job_type: str, version: int, supported: Sequence[int] = ()) -> None:
        self.job_type = job_type
        self.version = version
        self.supported = sorted(supported)
        listed = ", ".join(f"v{v}" for v in self.supported) or "none"
        super().__init__(
            f"job type {job_type!r} has no model for version {version} (supported: {listed}); "
            "deploy a worker that declares this version, or publish a supported version"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.job_type, self.version, self.supported))


class InvalidPayload(JobDecodeError):
    """The payload does not validate against the job's model.

    `errors` holds pydantic's error dicts (`type`, `loc`, `msg`), without the offending
    input, so they are safe to log and small enough for a dead-letter header.
    """

    reason = "invalid-payload"

    def __init__(self, job: str, errors: Iterable[Mapping[str, Any]]) -> None:
        self.job = job
        self.errors: list[dict[str, Any]] = [dict(e) for e in errors]
        problems = [f"{_where(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in self.errors]
        shown = "; ".join(problems[:_MAX_LISTED_ERRORS])
        if len(problems) > _MAX_LISTED_ERRORS:
            shown += f"; and {len(problems) - _MAX_LISTED_ERRORS} more"
        super().__init__(
            f"{job}: {shown} (fix the payload to match the job's JSON Schema, "
            "see docs/wire-contract.md)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.job, self.errors))


def _where(loc: Sequence[int | str]) -> str:
    """`('items', 0, 'name')` -> `field 'items[0].name'`; `()` -> `payload`."""
    if not loc:
        return "payload"
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return f"field {path!r}"
