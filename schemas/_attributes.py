"""The wire contract: the CloudEvents attributes of a job, validated, and what both header
bindings share (`_kafka.py` and `_nats.py` hold one binding each; every wire name is a
constant in `names.py`; docs/wire-contract.md is the prose version).

Guarantees:

- `JobAttributes` is valid by construction: required attributes are non-empty, times are
  timezone-aware and normalised to UTC, version and attempt are ints >= 1, extension names
  are CloudEvents-legal and never shadow a known attribute, and no value holds a control
  character (NATS headers are line-based). A violation raises `InvalidAttributes`.
- `from_kafka(*to_kafka(a)) == a` and `from_nats(to_nats(a)) == a` for every valid `a`
  (times keep microseconds; unknown `ce_` extensions are carried through unchanged).
- Encoding never produces more than `MAX_HEADER_BYTES` of headers: it raises instead, so
  a record cannot grow without bound as retries add attributes (SPEC 2, G4).
- Decoding rejects what it cannot trust with `InvalidAttributes`, naming the header.
- Pure functions: no I/O, no clock, no randomness.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from schemas._errors import InvalidAttributes
from schemas.names import (
    DATACONTENTTYPE,
    DATASCHEMA,
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

__all__ = ["MAX_HEADER_BYTES", "JobAttributes", "format_time", "parse_time"]

MAX_HEADER_BYTES = 16 * 1024
"""Upper bound on the bytes of a record's key and headers (names plus values)."""

_PLAIN_HEADERS = frozenset({KAFKA_CONTENT_TYPE, TRACEPARENT, TRACESTATE})
_EXTENSION_NAME = re.compile(r"^[a-z0-9]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
# Trace context is best-effort (W3C Trace Context: a traceparent that cannot be parsed is
# ignored, and a tracestate goes with its traceparent): a repeated header keeps its first
# value, an unreadable or malformed one is dropped; neither is a reason to refuse a job.
_TRACE_FIELDS = frozenset({TRACEPARENT, TRACESTATE, JOBORIGIN, JOBORIGINSTATE})
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_TRACESTATE_MAX = 512
_POSITIVE_INT = re.compile(r"^[0-9]{1,9}$")
_RFC3339 = re.compile(
    r"^([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))$"
)


@dataclasses.dataclass(frozen=True, slots=True)
class JobAttributes:
    """The CloudEvents context attributes of one job record, plus jobstream's extensions."""

    id: str
    """CloudEvents `id`: the job id, unique per job (a retry keeps it)."""
    type: str
    """CloudEvents `type`: the job type, e.g. `email.welcome`."""
    source: str
    """CloudEvents `source`: who published the job, e.g. `/services/signup`."""
    time: datetime
    """CloudEvents `time`: when the job was created (UTC)."""
    version: int = 1
    """`jobversion`: the payload schema version."""
    subject: str | None = None
    """CloudEvents `subject`: what the job is about, e.g. `user/42`."""
    dataschema: str | None = None
    """CloudEvents `dataschema`: `urn:jobstream:schema:<type>:v<version>`."""
    content_type: str = JSON
    """CloudEvents `datacontenttype`, the `content-type` header."""
    key: str | None = None
    """Ordering key: the Kafka record key, `partitionkey` on NATS. None: no ordering."""
    attempt: int = 1
    """`jobattempt`: 1 for the first delivery, incremented by each retry."""
    idempotency_key: str | None = None
    """`jobidemkey`: deduplication key chosen by the producer (defaults to the id)."""
    not_before: datetime | None = None
    """`jobnotbefore`: do not start the job before this time (UTC)."""
    traceparent: str | None = None
    """W3C `traceparent` of the publish that produced this record."""
    tracestate: str | None = None
    """W3C `tracestate` accompanying `traceparent`."""
    origin_traceparent: str | None = None
    """`joborigin`: traceparent of the request that created the job, kept across retries."""
    origin_tracestate: str | None = None
    """`joboriginstate`: tracestate accompanying `origin_traceparent`."""
    extensions: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Any other CloudEvents extension (e.g. failure details), kept as-is, sorted by name."""

    def __post_init__(self) -> None:
        for name in (ID, TYPE, SOURCE):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InvalidAttributes(f"attribute {name!r} must be a non-empty string")
        object.__setattr__(self, "time", _utc("time", self.time))
        if self.not_before is not None:
            object.__setattr__(self, "not_before", _utc("not_before", self.not_before))
        for name in ("version", "attempt"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidAttributes(f"attribute {name!r} must be an int >= 1, got {value!r}")
        # An empty key would silently order (or deduplicate) unrelated jobs together.
        for name in ("key", "idempotency_key"):
            if getattr(self, name) == "":
                raise InvalidAttributes(f"attribute {name!r} must be None or non-empty")
        extensions = _Extensions(self.extensions)
        for name, value in extensions.items():
            if not _EXTENSION_NAME.fullmatch(name) or name in RESERVED:
                raise InvalidAttributes(
                    f"extension name {name!r} is not allowed: CloudEvents extension names are "
                    "lowercase letters and digits, and must not repeat a known attribute"
                )
            _checktext(name, value)
        texts = [v for v in (getattr(self, name) for name in _TEXT_FIELDS) if isinstance(v, str)]
        # One scan of all values (the common, clean case); find the culprit only on failure.
        if _CONTROL.search(" ".join(texts)):
            for name in _TEXT_FIELDS:
                if isinstance(getattr(self, name), str):
                    _checktext(name, getattr(self, name))
        object.__setattr__(self, "extensions", extensions)

    @property
    def dedup_key(self) -> str:
        """The key the idempotency store uses: the idempotency key, else the job id."""
        return self.idempotency_key if self.idempotency_key is not None else self.id

    def replace(self, **changes: Any) -> JobAttributes:
        """A copy with `changes` applied (and validated), e.g. `replace(attempt=2)`."""
        return dataclasses.replace(self, **changes)

    def with_extensions(self, **updates: str | None) -> JobAttributes:
        """A copy with extensions added or overwritten; a value of None removes one."""
        merged = dict(self.extensions)
        for name, value in updates.items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = value
        return self.replace(extensions=merged)

    def without_extensions(self, prefix: str) -> JobAttributes:
        """A copy without the extensions whose names start with `prefix`."""
        kept = {n: v for n, v in self.extensions.items() if not n.startswith(prefix)}
        return self.replace(extensions=kept)


# The fields that hold text (the annotations are strings under `from __future__`).
_TEXT_FIELDS = tuple(
    f.name for f in dataclasses.fields(JobAttributes) if str(f.type) in ("str", "str | None")
)


class _Extensions(Mapping[str, str]):
    """An immutable, hashable, picklable mapping of extension attributes, sorted by name."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str]) -> None:
        self._items = dict(sorted(items.items()))

    def __getitem__(self, name: str) -> str:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with microseconds and `Z`, e.g. `2025-01-31T09:30:00.000000Z`."""
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_time(value: str) -> datetime:
    """An RFC 3339 timestamp as a UTC datetime (digits past microseconds are dropped)."""
    if len(value) in (20, 27) and value[10] == "T" and value[-1] == "Z" and value[4] == "-":
        # The form jobstream writes (`format_time`): the C parser, after the shape check.
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass  # fall through to the strict parser, which says what is wrong
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise ValueError(value)
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m = match.groups()
    offset = timedelta()
    if sign is not None:
        if int(off_h) > 23 or int(off_m) > 59:
            raise ValueError(value)
        offset = timedelta(hours=int(off_h), minutes=int(off_m)) * (-1 if sign == "-" else 1)
    micros = int((fraction or "0")[:6].ljust(6, "0"))
    y, mo, d, h, mi, s = (int(part) for part in (year, month, day, hour, minute, second))
    return datetime(y, mo, d, h, mi, s, micros, tzinfo=timezone(offset)).astimezone(UTC)


def ce_pairs(attrs: JobAttributes) -> list[tuple[str | None, str]]:
    """(CloudEvents attribute name, value) in wire order; None stands for the content type,
    which, like the trace context, has a binding-specific header name (`_header_name`)."""
    optional = [
        (SUBJECT, attrs.subject),
        (DATASCHEMA, attrs.dataschema),
        (None, attrs.content_type),
        (TRACEPARENT, attrs.traceparent),
        (TRACESTATE, attrs.tracestate),
        (JOBVERSION, str(attrs.version)),
        (JOBATTEMPT, str(attrs.attempt)),
        (JOBIDEMKEY, attrs.idempotency_key),
        (JOBNOTBEFORE, format_time(attrs.not_before) if attrs.not_before else None),
        (JOBORIGIN, attrs.origin_traceparent),
        (JOBORIGINSTATE, attrs.origin_tracestate),
    ]
    required = [(SPECVERSION_ATTR, SPECVERSION), (ID, attrs.id), (TYPE, attrs.type)]
    required += [(SOURCE, attrs.source), (TIME, format_time(attrs.time))]
    present = [(name, value) for name, value in optional if value is not None]
    return [*required, *present, *attrs.extensions.items()]


def header_name(name: str | None, prefix: str, content_type: str) -> str:
    if name is None:
        return content_type
    return name if name in (TRACEPARENT, TRACESTATE) else prefix + name


def check_size(attrs: JobAttributes, size: int) -> None:
    if size > MAX_HEADER_BYTES:
        largest = max(ce_pairs(attrs), key=lambda pair: len(pair[1].encode()))
        raise InvalidAttributes(
            f"job {attrs.id}: {size} bytes of headers exceed the limit of {MAX_HEADER_BYTES}; "
            f"keep attribute values small (largest: {largest[0] or 'content type'!r}, "
            f"{len(largest[1].encode())} bytes), and put data in the payload instead"
        )


def collect(
    headers: Iterable[tuple[str, str | bytes]], prefix: str
) -> tuple[dict[str, str], dict[str, str]]:
    """(CloudEvents attributes by name, plain headers by lowercased name) as text.

    Names are matched case-insensitively. Headers jobstream does not read are skipped
    before decoding, so another library's binary header never fails a job.
    """
    ce: dict[str, str] = {}
    plain: dict[str, str] = {}
    for name, raw in headers:
        lowered = name.lower()
        if lowered.startswith(prefix):
            target, field = ce, lowered.removeprefix(prefix)
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
        value = raw if isinstance(raw, str) else text("header", raw, name)
        # Kafka allows repeated header names; two different answers cannot both be trusted.
        if target.setdefault(field, value) != value:
            raise InvalidAttributes(f"header {name!r} appears twice with different values")
    return ce, plain


def _trace_text(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _trace_context(parent: str | None, state: str | None) -> tuple[str | None, str | None]:
    """(traceparent, tracestate) if `parent` is a W3C traceparent, else (None, None); a
    tracestate that is too long or holds control characters is dropped alone."""
    if parent is None or not _TRACEPARENT.match(parent) or _CONTROL.search(parent):
        return None, None
    if state is not None and (len(state) > _TRACESTATE_MAX or _CONTROL.search(state)):
        state = None
    return parent, state


def parse(ce: dict[str, str], plain: dict[str, str], prefix: str, key: str | None) -> JobAttributes:
    content_type = plain.get(KAFKA_CONTENT_TYPE) or ce.get(DATACONTENTTYPE) or JSON
    if content_type.lower().startswith("application/cloudevents"):
        raise InvalidAttributes(
            f"content type {content_type!r} is CloudEvents structured mode, which jobstream "
            f"does not read; publish in binary mode ({prefix}* headers, payload as the body)"
        )

    def required(name: str) -> str:
        value = ce.get(name)
        if not value:
            raise InvalidAttributes(
                f"missing required header {prefix}{name}; every job record needs "
                f"{prefix}specversion=1.0, {prefix}id, {prefix}type, {prefix}source and "
                f"{prefix}time (see docs/wire-contract.md)"
            )
        return value

    if (spec := required(SPECVERSION_ATTR)) != SPECVERSION:
        raise InvalidAttributes(f"{prefix}specversion is {spec!r}; jobstream reads 1.0 only")
    not_before = ce.get(JOBNOTBEFORE)
    # The plain W3C header wins; ce_traceparent is what some CloudEvents SDKs send.
    parent, state = _trace_context(
        plain.get(TRACEPARENT, ce.get(TRACEPARENT)), plain.get(TRACESTATE, ce.get(TRACESTATE))
    )
    origin, origin_state = _trace_context(ce.get(JOBORIGIN), ce.get(JOBORIGINSTATE))
    return JobAttributes(
        id=required(ID),
        type=required(TYPE),
        source=required(SOURCE),
        time=_time(prefix + TIME, required(TIME)),
        version=_int(prefix + JOBVERSION, ce.get(JOBVERSION, "1")),
        subject=ce.get(SUBJECT),
        dataschema=ce.get(DATASCHEMA),
        content_type=content_type,
        key=key or ce.get(PARTITIONKEY) or None,
        attempt=_int(prefix + JOBATTEMPT, ce.get(JOBATTEMPT, "1")),
        idempotency_key=ce.get(JOBIDEMKEY) or None,
        not_before=_time(prefix + JOBNOTBEFORE, not_before) if not_before is not None else None,
        traceparent=parent,
        tracestate=state,
        origin_traceparent=origin,
        origin_tracestate=origin_state,
        extensions={name: value for name, value in ce.items() if name not in RESERVED},
    )


def text(what: str, raw: str | bytes, name: str | None = None) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # The message is built only here: decoding is on every record's hot path.
        where = f"{what} {name!r}" if name is not None else what
        raise InvalidAttributes(f"{where} is not UTF-8; header values must be UTF-8 text") from None


def _int(header: str, value: str) -> int:
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


def _utc(name: str, value: object) -> datetime:
    if isinstance(value, datetime) and value.utcoffset() is not None:
        try:
            return value.astimezone(UTC)
        except OverflowError:
            pass
    raise InvalidAttributes(f"attribute {name!r} must be a timezone-aware datetime")


def _checktext(name: str, value: object) -> None:
    if not isinstance(value, str) or _CONTROL.search(value):
        raise InvalidAttributes(f"attribute {name!r} must be text without control characters")
