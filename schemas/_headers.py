"""What both header bindings share: the order and names of the headers jobstream writes,
and the reading of CloudEvents attributes from headers (`_kafka.py` and `_nats.py` each
add their binding's names and container).

Guarantees:

- `from_kafka(*to_kafka(a)) == a` and `from_nats(to_nats(a)) == a` for every valid `a`
  (times keep microseconds; unknown `ce_` extensions are carried through unchanged).
- Encoding never produces more than `MAX_HEADER_BYTES` of headers: it raises instead, so
  a record cannot grow without bound as retries add attributes (SPEC 2, G4). Headers are
  built and counted in one pass.
- Decoding rejects what it cannot trust with `InvalidAttributes`, naming the header. It
  reads and checks every value once: each header is classified and decoded in one loop
  (`collect`), then `read` checks the attributes in one pass (one control-character scan
  over every value, one check of the extension names) and builds them without checking
  again. A record it would refuse is handed to the validating `JobAttributes` constructor,
  so the error is the one that constructor gives, word for word.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime

from schemas._attributes import (
    MAX_HEADER_BYTES,
    JobAttributes,
    format_time,
    has_control,
    parse_time,
    trusted,
    trusted_extensions,
)
from schemas._errors import InvalidAttributes
from schemas.names import (
    DATACONTENTTYPE,
    DATASCHEMA,
    FAILURE_EXTENSIONS,
    ID,
    JOBATTEMPT,
    JOBIDEMKEY,
    JOBNOTBEFORE,
    JOBORIGIN,
    JOBORIGINSTATE,
    JOBVERSION,
    JSON,
    KAFKA_CONTENT_TYPE,
    PARTITIONKEY,
    RESERVED,
    SOURCE,
    SPECVERSION,
    SPECVERSION_ATTR,
    SUBJECT,
    TIME,
    TRACEPARENT,
    TRACESTATE,
    TYPE,
)

__all__ = [
    "collect",
    "decimal",
    "header_names",
    "known_names",
    "read",
    "text",
    "too_large",
    "wire_values",
]

# The attributes jobstream writes, in wire order (docs/wire-contract.md); None stands for
# the content type, which, like the trace context, has a binding-specific header name.
_WIRE_ORDER = (
    SPECVERSION_ATTR,
    ID,
    TYPE,
    SOURCE,
    TIME,
    SUBJECT,
    DATASCHEMA,
    None,
    TRACEPARENT,
    TRACESTATE,
    JOBVERSION,
    JOBATTEMPT,
    JOBIDEMKEY,
    JOBNOTBEFORE,
    JOBORIGIN,
    JOBORIGINSTATE,
)
_DECIMALS = tuple(str(number) for number in range(100))
_NUMBERS = {text: number for number, text in enumerate(_DECIMALS) if number >= 1}
_PLAIN_HEADERS = frozenset({KAFKA_CONTENT_TYPE, TRACEPARENT, TRACESTATE})
# Trace context is best-effort (W3C Trace Context: a traceparent that cannot be parsed is
# ignored, and a tracestate goes with its traceparent): a repeated header keeps its first
# value, an unreadable or malformed one is dropped; neither is a reason to refuse a job.
_TRACE_FIELDS = frozenset({TRACEPARENT, TRACESTATE, JOBORIGIN, JOBORIGINSTATE})
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_TRACESTATE_MAX = 512
_POSITIVE_INT = re.compile(r"^[0-9]{1,9}$")
# Extension names, concatenated: lowercase letters and digits only (each one non-empty).
_EXTENSION_NAMES = re.compile(r"^[a-z0-9]*$")


def header_names(prefix: str, content_type: str) -> tuple[str, ...]:
    """A binding's header name for each position of `wire_values`."""
    return tuple(
        content_type
        if name is None
        else name
        if name in (TRACEPARENT, TRACESTATE)
        else prefix + name
        for name in _WIRE_ORDER
    )


def wire_values(attrs: JobAttributes) -> list[str | None]:
    """The value of each attribute jobstream writes, in wire order (`header_names`); None
    for one that is not set. Extensions follow, from `attrs.extensions` (sorted)."""
    not_before = attrs.not_before
    return [
        SPECVERSION,
        attrs.id,
        attrs.type,
        attrs.source,
        format_time(attrs.time),
        attrs.subject,
        attrs.dataschema,
        attrs.content_type,
        attrs.traceparent,
        attrs.tracestate,
        decimal(attrs.version),
        decimal(attrs.attempt),
        attrs.idempotency_key,
        None if not_before is None else format_time(not_before),
        attrs.origin_traceparent,
        attrs.origin_tracestate,
    ]


def decimal(number: int) -> str:
    """`str(number)`, without building the common ones again."""
    return _DECIMALS[number] if number < len(_DECIMALS) else str(number)


def too_large(attrs: JobAttributes, size: int) -> InvalidAttributes:
    """The error for headers of `size` bytes, past `MAX_HEADER_BYTES`, naming the largest."""
    pairs = [*zip(_WIRE_ORDER, wire_values(attrs), strict=True), *attrs.extensions.items()]
    name, value = max(
        ((name, value) for name, value in pairs if value is not None),
        key=lambda pair: len(pair[1].encode()),
    )
    return InvalidAttributes(
        f"job {attrs.id}: {size} bytes of headers exceed the limit of {MAX_HEADER_BYTES}; "
        f"keep attribute values small (largest: {name or 'content type'!r}, "
        f"{len(value.encode())} bytes), and put data in the payload instead"
    )


def known_names(prefix: str) -> dict[str, str]:
    """A binding's `ce` header names as jobstream writes them, to their attribute: every
    known attribute and failure detail but the trace context (first one wins, `collect`)."""
    names = (RESERVED | frozenset(FAILURE_EXTENSIONS)) - _TRACE_FIELDS
    return {prefix + name: name for name in sorted(names)}


def collect(
    headers: Iterable[tuple[str, str | bytes | None]], prefix: str, known: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """(CloudEvents attributes by name, plain headers by lowercased name) as text.

    Names are matched case-insensitively; `known` maps the names as jobstream writes them
    to their CloudEvents attribute (`known_names`), which saves lowercasing the common
    ones. Headers
    jobstream does not read, and headers without a value, are skipped before decoding, so
    another library's binary header never fails a job.
    """
    ce: dict[str, str] = {}
    plain: dict[str, str] = {}
    name = ""
    try:
        for name, raw in headers:
            if raw is None:
                continue
            field = known.get(name)
            if field is not None:  # `known` holds no trace context field
                target = ce
            else:
                lowered = name.lower()
                if lowered.startswith(prefix):
                    target, field = ce, lowered[len(prefix) :]
                elif lowered in _PLAIN_HEADERS:
                    target, field = plain, lowered
                else:
                    continue
                if field in _TRACE_FIELDS:
                    if field not in target:  # the first one wins; an unreadable one is dropped
                        trace = raw if isinstance(raw, str) else _trace_text(raw)
                        if trace is not None:
                            target[field] = trace
                    continue
            value = raw if isinstance(raw, str) else raw.decode()
            # Kafka allows repeated header names; two different answers cannot both be trusted.
            if target.setdefault(field, value) != value:
                raise InvalidAttributes(f"header {name!r} appears twice with different values")
    except UnicodeDecodeError:
        raise _not_utf8("header", name) from None
    return ce, plain


def read(ce: dict[str, str], plain: dict[str, str], prefix: str, key: str | None) -> JobAttributes:
    """The attributes in `collect`'s result, checked once: `InvalidAttributes` if untrusted."""
    content_type = plain.get(KAFKA_CONTENT_TYPE) or ce.get(DATACONTENTTYPE) or JSON
    if content_type != JSON and content_type.lower().startswith("application/cloudevents"):
        raise InvalidAttributes(
            f"content type {content_type!r} is CloudEvents structured mode, which jobstream "
            f"does not read; publish in binary mode ({prefix}* headers, payload as the body)"
        )
    # The order of the checks is the order of the errors: keep it.
    spec, id_, type_, source = ce.get(SPECVERSION_ATTR), ce.get(ID), ce.get(TYPE), ce.get(SOURCE)
    created = ce.get(TIME)
    if spec != SPECVERSION or not (id_ and type_ and source and created):
        spec = _required(ce, SPECVERSION_ATTR, prefix)
        if spec != SPECVERSION:
            raise InvalidAttributes(f"{prefix}specversion is {spec!r}; jobstream reads 1.0 only")
        id_ = _required(ce, ID, prefix)
        type_ = _required(ce, TYPE, prefix)
        source = _required(ce, SOURCE, prefix)
        created = _required(ce, TIME, prefix)
    time = _time(prefix + TIME, created)
    version = _int(prefix + JOBVERSION, ce.get(JOBVERSION, "1"))
    attempt = _int(prefix + JOBATTEMPT, ce.get(JOBATTEMPT, "1"))
    not_before = ce.get(JOBNOTBEFORE)
    due = _time(prefix + JOBNOTBEFORE, not_before) if not_before is not None else None
    # The plain W3C header wins; ce_traceparent is what some CloudEvents SDKs send.
    parent, state = _trace_context(
        plain.get(TRACEPARENT, ce.get(TRACEPARENT)), plain.get(TRACESTATE, ce.get(TRACESTATE))
    )
    origin, origin_state = _trace_context(ce.get(JOBORIGIN), ce.get(JOBORIGINSTATE))
    subject, dataschema = ce.get(SUBJECT), ce.get(DATASCHEMA)
    key = key or ce.get(PARTITIONKEY) or None
    idempotency_key = ce.get(JOBIDEMKEY) or None
    extensions = {name: ce[name] for name in sorted(ce) if name not in RESERVED}
    texts = [id_, type_, source, content_type, *extensions.values()]
    texts += filter(
        None, (subject, dataschema, key, idempotency_key, parent, state, origin, origin_state)
    )
    # Everything else was checked above (required values non-empty, times in UTC, version
    # and attempt >= 1, keys None or non-empty): what is left is one scan of every value
    # and one check of every extension name.
    if not has_control(" ".join(texts)) and (
        not extensions or ("" not in extensions and _EXTENSION_NAMES.fullmatch("".join(extensions)))
    ):
        return trusted(
            id_,
            type_,
            source,
            time,
            version,
            subject,
            dataschema,
            content_type,
            key,
            attempt,
            idempotency_key,
            due,
            parent,
            state,
            origin,
            origin_state,
            trusted_extensions(extensions),
        )
    # Refused: the validating constructor names the culprit, as it always has.
    return JobAttributes(
        id=id_,
        type=type_,
        source=source,
        time=time,
        version=version,
        subject=subject,
        dataschema=dataschema,
        content_type=content_type,
        key=key,
        attempt=attempt,
        idempotency_key=idempotency_key,
        not_before=due,
        traceparent=parent,
        tracestate=state,
        origin_traceparent=origin,
        origin_tracestate=origin_state,
        extensions=extensions,
    )


def text(what: str, raw: str | bytes, name: str | None = None) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _not_utf8(what, name) from None


def _not_utf8(what: str, name: str | None) -> InvalidAttributes:
    # The message is built only here: decoding is on every record's hot path.
    where = f"{what} {name!r}" if name is not None else what
    return InvalidAttributes(f"{where} is not UTF-8; header values must be UTF-8 text")


def _required(ce: dict[str, str], name: str, prefix: str) -> str:
    value = ce.get(name)
    if not value:
        raise InvalidAttributes(
            f"missing required header {prefix}{name}; every job record needs "
            f"{prefix}specversion=1.0, {prefix}id, {prefix}type, {prefix}source and "
            f"{prefix}time (see docs/wire-contract.md)"
        )
    return value


def _trace_text(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _trace_context(parent: str | None, state: str | None) -> tuple[str | None, str | None]:
    """(traceparent, tracestate) if `parent` is a W3C traceparent, else (None, None); a
    tracestate that is too long or holds control characters is dropped alone."""
    if parent is None or not _TRACEPARENT.match(parent) or has_control(parent):
        return None, None
    if state is not None and (len(state) > _TRACESTATE_MAX or has_control(state)):
        state = None
    return parent, state


def _int(header: str, value: str) -> int:
    number = _NUMBERS.get(value)
    if number is not None:
        return number
    if not _POSITIVE_INT.fullmatch(value) or int(value) < 1:
        raise InvalidAttributes(f"header {header}={value!r} must be a positive decimal integer")
    return int(value)


def _time(header: str, value: str) -> datetime:
    try:
        return parse_time(value)
    except (ValueError, OverflowError):
        raise InvalidAttributes(
            f"header {header}={value!r} is not an RFC 3339 timestamp (e.g. 2025-01-31T09:30:00Z)"
        ) from None
