"""The CloudEvents attributes of a job, validated (`_headers.py` puts them on the wire,
`_kafka.py` and `_nats.py` hold one binding each; every wire name is a constant in
`names.py`; docs/wire-contract.md is the prose version).

Guarantees:

- `JobAttributes` is valid by construction: required attributes are non-empty, times are
  timezone-aware and normalised to UTC, version and attempt are ints >= 1, extension names
  are CloudEvents-legal and never shadow a known attribute, and no value holds a control
  character (NATS headers are line-based). A violation raises `InvalidAttributes`.
- Validation is cheap where it can be and complete everywhere: a plain case (exact types,
  UTC times, no control character, extensions already checked) is accepted by one quick
  test; anything else takes the full check, which names the culprit. The quick test only
  ever accepts what the full check accepts, unchanged.
- `trusted` builds attributes without the check, for the header decoder only, which has
  already checked every value in the same pass (`_headers.read`).
- Pure functions: no I/O, no clock, no randomness.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import ItemsView, Iterator, KeysView, Mapping, ValuesView
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from schemas._errors import InvalidAttributes
from schemas.names import ID, JSON, RESERVED, SOURCE, TYPE

__all__ = [
    "MAX_HEADER_BYTES",
    "JobAttributes",
    "format_time",
    "has_control",
    "parse_time",
    "trusted",
    "trusted_extensions",
]

MAX_HEADER_BYTES = 16 * 1024
"""Upper bound on the bytes of a record's key and headers (names plus values)."""

_EXTENSION_NAME = re.compile(r"^[a-z0-9]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
_RFC3339_UTC = "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ"
_RFC3339 = re.compile(
    r"^([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))$"
)


def has_control(text: str) -> bool:
    """Whether `text` holds a control character (C0, DEL) or a lone surrogate."""
    # For ASCII text, "not printable" is exactly C0 and DEL, and the C loop is quicker.
    if text.isascii():
        return not text.isprintable()
    return _CONTROL.search(text) is not None


class _Extensions(Mapping[str, str]):
    """An immutable, hashable, picklable mapping of extension attributes, sorted by name,
    valid by construction (so attributes built from it need not check it again)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str]) -> None:
        ordered = dict(sorted(items.items()))
        for name, value in ordered.items():
            if not _EXTENSION_NAME.fullmatch(name) or name in RESERVED:
                raise InvalidAttributes(
                    f"extension name {name!r} is not allowed: CloudEvents extension names are "
                    "lowercase letters and digits, and must not repeat a known attribute"
                )
            _checktext(name, value)
        self._items = ordered

    def __getitem__(self, name: str) -> str:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def items(self) -> ItemsView[str, str]:
        return self._items.items()  # read-only, and cheaper than the generic view

    def keys(self) -> KeysView[str]:
        return self._items.keys()

    def values(self) -> ValuesView[str]:
        return self._items.values()

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)

    @classmethod
    def trusted(cls, ordered: dict[str, str]) -> _Extensions:
        """`ordered` as it is: the caller checked it as `__init__` would, and sorted it."""
        extensions = object.__new__(cls)
        extensions._items = ordered
        return extensions


def trusted_extensions(ordered: dict[str, str]) -> Mapping[str, str]:
    """Extensions the caller has checked: names `[a-z0-9]+`, none in `RESERVED`, values
    without control characters, sorted by name."""
    return _Extensions.trusted(ordered) if ordered else _NO_EXTENSIONS


_NO_EXTENSIONS = _Extensions.trusted({})


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
    extensions: Mapping[str, str] = _NO_EXTENSIONS
    """Any other CloudEvents extension (e.g. failure details), kept as-is, sorted by name."""

    def __post_init__(self) -> None:
        if not _plainly_valid(self):
            _validate(self)

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


def _plainly_valid(attrs: JobAttributes) -> bool:
    """True only if `_validate` would accept `attrs` and change nothing: exact types, UTC
    times, already-checked extensions, no control character. False says nothing."""
    time, not_before, version, attempt = attrs.time, attrs.not_before, attrs.version, attrs.attempt
    if not (
        type(attrs.id) is str
        and type(attrs.type) is str
        and type(attrs.source) is str
        and attrs.id != ""
        and attrs.type != ""
        and attrs.source != ""
        and type(time) is datetime
        and time.tzinfo is UTC
        and (not_before is None or (type(not_before) is datetime and not_before.tzinfo is UTC))
        and type(version) is int
        and version >= 1
        and type(attempt) is int
        and attempt >= 1
        and attrs.key != ""
        and attrs.idempotency_key != ""
        and type(attrs.extensions) is _Extensions
    ):
        return False
    # `filter` drops None (and empty or falsy values, which the full check ignores too,
    # or rejects above); a value that is not text makes `join` raise.
    texts = filter(
        None,
        (
            attrs.id,
            attrs.type,
            attrs.source,
            attrs.subject,
            attrs.dataschema,
            attrs.content_type,
            attrs.key,
            attrs.idempotency_key,
            attrs.traceparent,
            attrs.tracestate,
            attrs.origin_traceparent,
            attrs.origin_tracestate,
        ),
    )
    try:
        return not has_control(" ".join(texts))
    except TypeError:  # a value that is not text: `_validate` decides
        return False


def _validate(attrs: JobAttributes) -> None:
    """The full check: raises `InvalidAttributes` naming the first culprit, normalises the
    times to UTC and the extensions to a checked `_Extensions`."""
    for name in (ID, TYPE, SOURCE):
        if not isinstance(getattr(attrs, name), str) or not getattr(attrs, name):
            raise InvalidAttributes(f"attribute {name!r} must be a non-empty string")
    object.__setattr__(attrs, "time", _utc("time", attrs.time))
    if attrs.not_before is not None:
        object.__setattr__(attrs, "not_before", _utc("not_before", attrs.not_before))
    for name in ("version", "attempt"):
        value = getattr(attrs, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidAttributes(f"attribute {name!r} must be an int >= 1, got {value!r}")
    # An empty key would silently order (or deduplicate) unrelated jobs together.
    for name in ("key", "idempotency_key"):
        if getattr(attrs, name) == "":
            raise InvalidAttributes(f"attribute {name!r} must be None or non-empty")
    extensions = attrs.extensions
    if type(extensions) is not _Extensions:  # one of ours is checked already
        empty = type(extensions) is dict and not extensions
        extensions = _NO_EXTENSIONS if empty else _Extensions(extensions)
    texts = [v for v in (getattr(attrs, name) for name in _TEXT_FIELDS) if isinstance(v, str)]
    # One scan of all values (the common, clean case); find the culprit only on failure.
    if has_control(" ".join(texts)):
        for name in _TEXT_FIELDS:
            if isinstance(getattr(attrs, name), str):
                _checktext(name, getattr(attrs, name))
    object.__setattr__(attrs, "extensions", extensions)


_new = object.__new__
_set = object.__setattr__


def trusted(
    id: str,  # named after the CloudEvents attribute, shadowing is fine
    type: str,  # ditto
    source: str,
    time: datetime,
    version: int,
    subject: str | None,
    dataschema: str | None,
    content_type: str,
    key: str | None,
    attempt: int,
    idempotency_key: str | None,
    not_before: datetime | None,
    traceparent: str | None,
    tracestate: str | None,
    origin_traceparent: str | None,
    origin_tracestate: str | None,
    extensions: Mapping[str, str],
) -> JobAttributes:
    """`JobAttributes` without its check, for values the caller has checked in the same
    pass as the constructor would (times in UTC, `extensions` from `trusted_extensions`).
    Only the header decoder calls this; everything else uses the validating constructor.
    (A field added to `JobAttributes` is added here too: a unit test checks it.)"""
    attrs: JobAttributes = _new(JobAttributes)
    _set(attrs, "id", id)
    _set(attrs, "type", type)
    _set(attrs, "source", source)
    _set(attrs, "time", time)
    _set(attrs, "version", version)
    _set(attrs, "subject", subject)
    _set(attrs, "dataschema", dataschema)
    _set(attrs, "content_type", content_type)
    _set(attrs, "key", key)
    _set(attrs, "attempt", attempt)
    _set(attrs, "idempotency_key", idempotency_key)
    _set(attrs, "not_before", not_before)
    _set(attrs, "traceparent", traceparent)
    _set(attrs, "tracestate", tracestate)
    _set(attrs, "origin_traceparent", origin_traceparent)
    _set(attrs, "origin_tracestate", origin_tracestate)
    _set(attrs, "extensions", extensions)
    return attrs


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with microseconds and `Z`, e.g. `2025-01-31T09:30:00.000000Z`."""
    if value.tzinfo is UTC:  # what `JobAttributes` holds; twice as fast as `isoformat`
        return _RFC3339_UTC % (
            value.year,
            value.month,
            value.day,
            value.hour,
            value.minute,
            value.second,
            value.microsecond,
        )
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


def _utc(name: str, value: object) -> datetime:
    if isinstance(value, datetime) and value.utcoffset() is not None:
        try:
            return value.astimezone(UTC)
        except OverflowError:
            pass
    raise InvalidAttributes(f"attribute {name!r} must be a timezone-aware datetime")


def _checktext(name: str, value: object) -> None:
    if not isinstance(value, str) or has_control(value):
        raise InvalidAttributes(f"attribute {name!r} must be text without control characters")
