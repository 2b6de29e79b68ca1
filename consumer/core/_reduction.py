"""Reduced dead letters: what is stored when the broker refuses a dead letter whole.

A dead letter is the original key, body and headers plus the failure details. When the
broker refuses it for good (over its size limit, most often), the runtime stores it
reduced, in two steps, each only if the one before was refused (`DEAD_LETTER_FORMS`):

1. `body`: the body is replaced by nothing; `jobbodybytes` and `jobbodysha256` say what it
   was (its size and sha256), so the job can be found and matched with its original.
2. `body,headers`: also the headers are replaced by the job's identity (specversion, id,
   type, source, time, version, attempt, idempotency key, content type) and the failure
   details, each value cut to `MAX_KEPT_VALUE_BYTES`; `jobheadersbytes` and
   `jobheaderssha256` describe the headers the record came with.

`jobreduced` names the step, `jobreducedwhy` the broker's refusal. The prefix is the
binding's (`ce_` on Kafka and memory, `ce-` on NATS). Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from schemas.names import (
    BODY_BYTES,
    BODY_SHA256,
    DATACONTENTTYPE,
    FAILURE_EXTENSIONS,
    HEADERS_BYTES,
    HEADERS_SHA256,
    ID,
    JOBATTEMPT,
    JOBIDEMKEY,
    JOBVERSION,
    KAFKA_CONTENT_TYPE,
    REDUCED,
    REDUCED_WHY,
    SOURCE,
    SPECVERSION_ATTR,
    TIME,
    TYPE,
)

__all__ = ["DEAD_LETTER_FORMS", "MAX_KEPT_VALUE_BYTES", "reduced_dead_letter"]

Headers = list[tuple[str, bytes]]

DEAD_LETTER_FORMS = ("whole", "body", "body,headers")
"""The forms a dead letter is offered to the broker in, in order."""
MAX_KEPT_VALUE_BYTES = 1024
"""In the `body,headers` form: the most bytes kept of each header value."""
_MAX_WHY_BYTES = 300
_IDENTITY = {SPECVERSION_ATTR, ID, TYPE, SOURCE, TIME, JOBVERSION, JOBATTEMPT, JOBIDEMKEY}
_KEPT = _IDENTITY | set(FAILURE_EXTENSIONS) | {DATACONTENTTYPE}


def reduced_dead_letter(
    form: str,
    headers: Headers,
    body: bytes,
    original: Sequence[tuple[str, bytes | None]],
    *,
    why: str,
    prefix: str,
) -> tuple[Headers, bytes]:
    """The dead letter (`headers`, `body`) in `form` (one of `DEAD_LETTER_FORMS`).

    `original`: the headers the job's record came with (digested in the second form);
    `why`: the refusal that made a reduction necessary; `prefix`: `ce_` or `ce-`."""
    if form == "whole":
        return headers, body
    details = {
        REDUCED: form,
        REDUCED_WHY: _cut(why, _MAX_WHY_BYTES),
        BODY_BYTES: str(len(body)),
        BODY_SHA256: hashlib.sha256(body).hexdigest(),
    }
    if form == "body,headers":
        digest = hashlib.sha256()
        size = 0
        for name, value in original:
            encoded = name.encode("utf-8", "replace")
            digest.update(encoded + b"\x00" + (value or b"") + b"\x00")
            size += len(encoded) + len(value or b"")
        details |= {HEADERS_BYTES: str(size), HEADERS_SHA256: digest.hexdigest()}
        headers = [
            (name, value[:MAX_KEPT_VALUE_BYTES])
            for name, value in headers
            if _attribute(name, prefix) in _KEPT
        ]
    names = {prefix + name for name in details}
    kept = [(name, value) for name, value in headers if name.lower() not in names]
    return kept + [(prefix + name, value.encode()) for name, value in details.items()], b""


def _attribute(header: str, prefix: str) -> str | None:
    lowered = header.lower()
    if lowered == KAFKA_CONTENT_TYPE:
        return DATACONTENTTYPE
    return lowered.removeprefix(prefix) if lowered.startswith(prefix) else None


def _cut(text: str, limit_bytes: int) -> str:
    return text.encode("utf-8", "replace")[:limit_bytes].decode("utf-8", "ignore")
