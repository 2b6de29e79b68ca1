"""The quick paths of the wire codec (issue 16) accept and refuse exactly what the slow,
obviously-right paths do.

The oracle is the codec as it was before its quick paths: headers collected into dicts,
parsed, then handed to a validating constructor that checks every attribute again
(`reference_decode`, `reference_validate`, copied from the code they replaced). Hypothesis
throws many malformed header sets and attribute values at both and compares the outcome:
the same attributes, or `InvalidAttributes` with the same message.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import (
    MAX_HEADER_BYTES,
    InvalidAttributes,
    JobAttributes,
    encode,
    from_kafka,
    from_nats,
    header_bytes,
    to_kafka,
    to_nats,
)
from schemas._attributes import _validate, format_time, has_control, parse_time, trusted
from schemas._codec import new_id
from schemas._headers import header_names, wire_values
from schemas._kafka import kafka_headers
from schemas._nats import nats_headers
from schemas.examples import GenerateReport, SendWelcomeEmail
from schemas.names import RESERVED

TIME = datetime(2025, 1, 31, 9, 30, 0, 123456, tzinfo=UTC)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
ORIGIN = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
MINIMAL = JobAttributes(id="job-1", type="email.welcome", source="/signup", time=TIME)
FULL = JobAttributes(
    id="job-1",
    type="email.welcome",
    source="/signup",
    time=TIME,
    version=2,
    subject="user/42",
    dataschema="urn:jobstream:schema:email.welcome:v2",
    key="user-42",
    attempt=3,
    idempotency_key="welcome-42",
    not_before=TIME + timedelta(minutes=5),
    traceparent=TRACEPARENT,
    tracestate="vendor=1",
    origin_traceparent=ORIGIN,
    origin_tracestate="vendor=0",
    extensions={"zeta": "z", "alpha": "a"},
)
RETRIED = MINIMAL.replace(attempt=2, key="k").with_extensions(
    jobreason="handler-error", joberror="boom: ü", jobsrcoffset="12", jobprevattempt=ORIGIN
)

# ---------------------------------------------------------------------------------------
# The oracle: the decoder and the validation as they were before the quick paths.

_CONTROL = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
_EXTENSION_NAME = re.compile(r"^[a-z0-9]+$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_POSITIVE_INT = re.compile(r"^[0-9]{1,9}$")
_PLAIN = frozenset({"content-type", "traceparent", "tracestate"})
_TRACE = frozenset({"traceparent", "tracestate", "joborigin", "joboriginstate"})
_TEXT_FIELDS = (
    "id",
    "type",
    "source",
    "subject",
    "dataschema",
    "content_type",
    "key",
    "idempotency_key",
    "traceparent",
    "tracestate",
    "origin_traceparent",
    "origin_tracestate",
)


def _text(what: str, raw: str | bytes, name: str | None = None) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        where = f"{what} {name!r}" if name is not None else what
        raise InvalidAttributes(f"{where} is not UTF-8; header values must be UTF-8 text") from None


def _collect(
    headers: Iterable[tuple[str, str | bytes]], prefix: str
) -> tuple[dict[str, str], dict[str, str]]:
    ce: dict[str, str] = {}
    plain: dict[str, str] = {}
    for name, raw in headers:
        lowered = name.lower()
        if lowered.startswith(prefix):
            target, field = ce, lowered.removeprefix(prefix)
        elif lowered in _PLAIN:
            target, field = plain, lowered
        else:
            continue
        if field in _TRACE:
            if field not in target:
                try:
                    trace = raw if isinstance(raw, str) else raw.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                target[field] = trace
            continue
        value = raw if isinstance(raw, str) else _text("header", raw, name)
        if target.setdefault(field, value) != value:
            raise InvalidAttributes(f"header {name!r} appears twice with different values")
    return ce, plain


def _trace_context(parent: str | None, state: str | None) -> tuple[str | None, str | None]:
    if parent is None or not _TRACEPARENT.match(parent) or _CONTROL.search(parent):
        return None, None
    if state is not None and (len(state) > 512 or _CONTROL.search(state)):
        state = None
    return parent, state


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


def _parse(ce: dict[str, str], plain: dict[str, str], prefix: str, key: str | None) -> Any:
    content_type = plain.get("content-type") or ce.get("datacontenttype") or "application/json"
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

    if (spec := required("specversion")) != "1.0":
        raise InvalidAttributes(f"{prefix}specversion is {spec!r}; jobstream reads 1.0 only")
    not_before = ce.get("jobnotbefore")
    parent, state = _trace_context(
        plain.get("traceparent", ce.get("traceparent")),
        plain.get("tracestate", ce.get("tracestate")),
    )
    origin, origin_state = _trace_context(ce.get("joborigin"), ce.get("joboriginstate"))
    return reference_validate(
        id=required("id"),
        type=required("type"),
        source=required("source"),
        time=_time(prefix + "time", required("time")),
        version=_int(prefix + "jobversion", ce.get("jobversion", "1")),
        subject=ce.get("subject"),
        dataschema=ce.get("dataschema"),
        content_type=content_type,
        key=key or ce.get("partitionkey") or None,
        attempt=_int(prefix + "jobattempt", ce.get("jobattempt", "1")),
        idempotency_key=ce.get("jobidemkey") or None,
        not_before=_time(prefix + "jobnotbefore", not_before) if not_before is not None else None,
        traceparent=parent,
        tracestate=state,
        origin_traceparent=origin,
        origin_tracestate=origin_state,
        extensions={name: value for name, value in ce.items() if name not in RESERVED},
    )


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


DEFAULTS: dict[str, Any] = {
    "version": 1,
    "subject": None,
    "dataschema": None,
    "content_type": "application/json",
    "key": None,
    "attempt": 1,
    "idempotency_key": None,
    "not_before": None,
    "traceparent": None,
    "tracestate": None,
    "origin_traceparent": None,
    "origin_tracestate": None,
    "extensions": {},
}


def reference_validate(**given: Any) -> dict[str, Any]:
    """The fields the old validating constructor stored for `given`, or its error."""
    values = {**DEFAULTS, **given}
    for name in ("id", "type", "source"):
        if not isinstance(values[name], str) or not values[name]:
            raise InvalidAttributes(f"attribute {name!r} must be a non-empty string")
    values["time"] = _utc("time", values["time"])
    if values["not_before"] is not None:
        values["not_before"] = _utc("not_before", values["not_before"])
    for name in ("version", "attempt"):
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidAttributes(f"attribute {name!r} must be an int >= 1, got {value!r}")
    for name in ("key", "idempotency_key"):
        if values[name] == "":
            raise InvalidAttributes(f"attribute {name!r} must be None or non-empty")
    extensions = dict(sorted(values["extensions"].items()))
    for name, value in extensions.items():
        if not _EXTENSION_NAME.fullmatch(name) or name in RESERVED:
            raise InvalidAttributes(
                f"extension name {name!r} is not allowed: CloudEvents extension names are "
                "lowercase letters and digits, and must not repeat a known attribute"
            )
        _checktext(name, value)
    texts = [values[name] for name in _TEXT_FIELDS if isinstance(values[name], str)]
    if _CONTROL.search(" ".join(texts)):
        for name in _TEXT_FIELDS:
            if isinstance(values[name], str):
                _checktext(name, values[name])
    values["extensions"] = extensions
    return values


def reference_decode(key: bytes | None, headers: list[tuple[str, bytes | None]]) -> Any:
    ce, plain = _collect(((n, v) for n, v in headers if v is not None), "ce_")
    return _parse(ce, plain, "ce_", _text("the record key", key) if key else None)


def reference_decode_nats(headers: Mapping[str, str]) -> Any:
    ce, plain = _collect(headers.items(), "ce-")
    return _parse(ce, plain, "ce-", None)


# ---------------------------------------------------------------------------------------
# Outcomes, compared field by field (with the identity of the time zone and the exact
# types, which `==` would not see).


def _shape(value: object) -> object:
    if isinstance(value, datetime):
        return (type(value), value, value.tzinfo is UTC)
    if isinstance(value, Mapping):
        return tuple(value.items())
    return (type(value), value)


def fields_of(attrs: JobAttributes) -> dict[str, object]:
    return {f.name: _shape(getattr(attrs, f.name)) for f in dataclasses.fields(JobAttributes)}


def outcome(run: Callable[[], JobAttributes]) -> tuple[str, object]:
    try:
        attrs = run()
    except InvalidAttributes as error:
        return "refused", str(error)
    return "accepted", fields_of(attrs)


def reference_outcome(run: Callable[[], dict[str, Any]]) -> tuple[str, object]:
    try:
        values = run()
    except InvalidAttributes as error:
        return "refused", str(error)
    return "accepted", {name: _shape(value) for name, value in values.items()}


# ---------------------------------------------------------------------------------------
# Malformed header sets.

VALUES = [
    b"",
    b" ",
    b"1.0",
    b"0.3",
    b"1",
    b"2",
    b"0",
    b"-1",
    b"01",
    b"+2",
    b"1_0",
    b"99",
    b"100",
    b"999999999",
    b"1000000000",
    b"two",
    b"2025-01-31T09:30:00Z",
    b"2025-01-31T09:30:00.123456Z",
    b"2025-01-31t09:30:00.5z",
    b"2025-02-30T09:30:00Z",
    b"2025-01-31T09:30:00",
    b"2025-01-31T04:00:00-05:30",
    b"2025-01-31T04:00:00+24:00",
    b"0001-01-01T00:00:00+01:00",
    b"9999-12-31T23:59:59-01:00",
    b"application/json",
    b"application/cloudevents+json",
    b"Application/CloudEvents-Batch+json",
    b"text/plain",
    TRACEPARENT.encode(),
    ORIGIN.encode(),
    b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    TRACEPARENT.encode() + b"\n",
    b"vendor=1",
    b"x" * 600,
    b"\xff\xfe",
    b"\xed\xa0\x80",  # an encoded surrogate: not UTF-8
    b"a\r\nInjected: 1",
    b"tab\there",
    b"del\x7f",
    b"nul\x00",
    "é ü €".encode(),
    "\u2028\u00a0".encode(),
    "\U0001f600".encode(),
]
NAMES = [
    "ce_specversion",
    "ce_id",
    "ce_type",
    "ce_source",
    "ce_time",
    "ce_subject",
    "ce_dataschema",
    "ce_datacontenttype",
    "content-type",
    "Content-Type",
    "traceparent",
    "TraceParent",
    "tracestate",
    "ce_traceparent",
    "ce_tracestate",
    "ce_jobversion",
    "ce_jobattempt",
    "ce_jobidemkey",
    "ce_jobnotbefore",
    "ce_joborigin",
    "ce_joboriginstate",
    "ce_partitionkey",
    "CE_ID",
    "Ce_Type",
    "ce_",
    "ce_tenant",
    "ce_Tenant",
    "ce_bad_name",
    "ce_a b",
    "ce_İd",
    "ce_jobreason",
    "ce_jobsrcoffset",
    "ce_jobprevattempt",
    "ce-id",
    "x-other",
    "b3",
]
value = st.one_of(
    st.sampled_from([*VALUES, None]),
    st.binary(max_size=12),
    st.text(max_size=12).map(lambda text: text.encode("utf-8", "surrogatepass")),
)
edit = st.tuples(
    st.sampled_from(["set", "add", "drop", "rename"]),
    st.integers(min_value=0, max_value=40),
    st.sampled_from(NAMES) | st.text(max_size=8).map(lambda text: "ce_" + text),
    value,
)
record_key = st.sampled_from([None, b"", b"user-42", b"\xff", b"a\nb", "ü".encode()]) | st.binary(
    max_size=6
)


def mutate(
    headers: list[tuple[str, bytes | None]], edits: list[tuple[str, int, str, bytes | None]]
) -> list[tuple[str, bytes | None]]:
    headers = list(headers)
    for kind, at, name, raw in edits:
        where = at % (len(headers) + 1)
        if kind == "add" or not headers:
            headers.insert(where, (name, raw))
        elif kind == "set":
            headers[where % len(headers)] = (headers[where % len(headers)][0], raw)
        elif kind == "drop":
            del headers[where % len(headers)]
        else:
            headers[where % len(headers)] = (name, headers[where % len(headers)][1])
    return headers


BASES = [to_kafka(MINIMAL)[1], to_kafka(FULL)[1], to_kafka(RETRIED)[1]]


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(BASES),
    edits=st.lists(edit, max_size=5),
    key=record_key,
)
def test_from_kafka_decides_as_the_two_pass_decoder(
    base: list[tuple[str, bytes | None]],
    edits: list[tuple[str, int, str, bytes | None]],
    key: bytes | None,
) -> None:
    headers = mutate(base, edits)
    expected = reference_outcome(lambda: reference_decode(key, headers))
    assert outcome(lambda: from_kafka(key, headers)) == expected


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(BASES),
    edits=st.lists(edit, max_size=5),
)
def test_from_nats_decides_as_the_two_pass_decoder(
    base: list[tuple[str, bytes | None]], edits: list[tuple[str, int, str, bytes | None]]
) -> None:
    # NATS headers are text in a mapping: rename to the `ce-` binding, decode what decodes.
    headers: dict[str, str] = {}
    for name, raw in mutate(base, edits):
        if raw is not None:
            nats_name = "ce-" + name[3:] if name.lower().startswith("ce_") else name
            headers[nats_name] = raw.decode("utf-8", "surrogateescape")
    expected = reference_outcome(lambda: reference_decode_nats(headers))
    assert outcome(lambda: from_nats(headers)) == expected


def test_accepted_records_pass_the_validating_constructor_unchanged() -> None:
    # The quick path builds attributes without the constructor's check: they must be what
    # the constructor makes of the same values.
    for attrs in (MINIMAL, FULL, RETRIED):
        decoded = from_kafka(*to_kafka(attrs))
        rebuilt = JobAttributes(
            **{f.name: getattr(decoded, f.name) for f in dataclasses.fields(decoded)}
        )
        assert fields_of(rebuilt) == fields_of(decoded) == fields_of(attrs)
        assert fields_of(from_nats(to_nats(attrs))) == fields_of(attrs)


# ---------------------------------------------------------------------------------------
# The validating constructor: its quick test accepts only what the full check accepts.


class Text(str):
    __slots__ = ()


class Number(int):
    pass


class Moment(datetime):
    pass


PLUS_TWO = timezone(timedelta(hours=2))
texts = st.one_of(
    st.none(),
    st.sampled_from(["", "x", "user/42", "a\nb", "\x7f", "\ud800", "é", "\u2028", Text("t")]),
    st.text(max_size=6),
    st.sampled_from([5, b"bytes", True]),
)
times = st.sampled_from(
    [
        TIME,
        TIME.astimezone(PLUS_TWO),
        TIME.replace(tzinfo=None),
        TIME.replace(tzinfo=timezone(timedelta(0))),
        Moment(2025, 1, 1, tzinfo=UTC),
        datetime.min.replace(tzinfo=PLUS_TWO),
        "2025-01-31T09:30:00Z",
    ]
)
numbers = st.sampled_from([1, 2, 0, -1, True, Number(3), 1.0, "1"])
extensions = st.one_of(
    st.dictionaries(
        st.sampled_from(["a", "tenant", "jobattempt", "Upper", "bad_name", "", "x1", "é"]),
        st.sampled_from(["v", "", "line\nbreak", "\ud800", "ü"]),
        max_size=3,
    ),
    st.just(FULL.extensions),
    st.just(MINIMAL.extensions),
)


FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "id": texts,
    "type": texts,
    "source": texts,
    "time": times,
    "not_before": st.none() | times,
    "version": numbers,
    "attempt": numbers,
    "subject": texts,
    "dataschema": texts,
    "content_type": texts,
    "key": texts,
    "idempotency_key": texts,
    "traceparent": texts,
    "tracestate": texts,
    "origin_traceparent": texts,
    "origin_tracestate": texts,
    "extensions": extensions,
}
VALID: dict[str, Any] = {
    f.name: getattr(RETRIED.replace(subject="s", not_before=TIME), f.name)
    for f in dataclasses.fields(JobAttributes)
}


@st.composite
def attribute_values(draw: st.DrawFn) -> dict[str, Any]:
    """Valid values with a few fields replaced by anything, valid or not."""
    names = draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), max_size=4, unique=True))
    return {**VALID, **{name: draw(FIELD_VALUES[name]) for name in names}}


@settings(max_examples=2000, deadline=None)
@given(given=attribute_values())
def test_the_constructor_decides_as_the_full_check(given: dict[str, Any]) -> None:
    expected = reference_outcome(lambda: reference_validate(**given))
    assert outcome(lambda: JobAttributes(**given)) == expected


@settings(max_examples=300, deadline=None)
@given(subject=texts, key=texts, extensions=extensions, time=times)
def test_the_quick_test_never_changes_what_the_full_check_would(**given: Any) -> None:
    # Build once with the quick test, then run the full check on the result alone: it must
    # neither refuse it nor change a field.
    try:
        attrs = JobAttributes(id="j", type="t", source="s", **given)
    except InvalidAttributes:
        return
    before = fields_of(attrs)
    _validate(attrs)
    assert fields_of(attrs) == before


def test_trusted_sets_every_field() -> None:
    for attrs in (MINIMAL, FULL, RETRIED):
        built = trusted(**{f.name: getattr(attrs, f.name) for f in dataclasses.fields(attrs)})
        assert fields_of(built) == fields_of(attrs)
        assert built == attrs
        assert hash(built) == hash(attrs)


def test_has_control_is_the_control_character_pattern() -> None:
    every = [chr(point) for point in range(0x3100)] + [chr(0xD800), chr(0xDFFF), "\U0001f600"]
    for char in every:
        for text in (char, "ascii " + char, "é" + char):
            assert has_control(text) == bool(_CONTROL.search(text)), repr(text)
    assert not has_control("")


# ---------------------------------------------------------------------------------------
# Encoding: sizes counted in the same pass, ids as uuid4 gives them.


def kafka_size(attrs: JobAttributes) -> int:
    key, headers, _ = kafka_headers(attrs)
    return len(key or b"") + sum(len(name.encode()) + len(value) for name, value in headers)


def nats_size(attrs: JobAttributes) -> int:
    headers, _ = nats_headers(attrs)
    return sum(len(name.encode()) + len(value.encode()) for name, value in headers.items())


@pytest.mark.parametrize("attrs", [MINIMAL, FULL, RETRIED], ids=["minimal", "full", "retried"])
def test_sizes_counted_in_the_same_pass_are_utf8_bytes(attrs: JobAttributes) -> None:
    for variant in (attrs, attrs.replace(subject="é€\U0001f600", key="ü")):
        assert kafka_headers(variant)[2] == kafka_size(variant)
        assert nats_headers(variant)[1] == nats_size(variant)
        assert header_bytes(variant) == max(kafka_size(variant), nats_size(variant))


@pytest.mark.parametrize("filler", ["x", "é", "€", "\U0001f600"])
@pytest.mark.parametrize(
    ("to_headers", "size_of"), [(to_kafka, kafka_size), (to_nats, nats_size)], ids=["kafka", "nats"]
)
def test_the_size_limit_is_exact_in_utf8_bytes(
    filler: str, to_headers: Callable[[JobAttributes], object], size_of: Callable[..., int]
) -> None:
    attrs = RETRIED.replace(subject="")
    count = (MAX_HEADER_BYTES - size_of(attrs)) // len(filler.encode())
    fits = attrs.replace(subject=filler * count)
    assert MAX_HEADER_BYTES - len(filler.encode()) < size_of(fits) <= MAX_HEADER_BYTES
    to_headers(fits)
    over = attrs.replace(subject=filler * (count + 1))
    with pytest.raises(InvalidAttributes, match=r"exceed the limit of 16384.*'subject'"):
        to_headers(over)


def test_new_ids_are_random_version_4_uuids() -> None:
    ids = [new_id() for _ in range(4000)]
    assert len(set(ids)) == len(ids)
    ones = zeros = 0
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
        ones |= parsed.int
        zeros |= ~parsed.int & ((1 << 128) - 1)
    # Each of the 122 random bits was seen both set and clear; the other 6 never vary.
    fixed = (0xF000 << 64) | (0xC000 << 48)
    assert ones | fixed == zeros | fixed == (1 << 128) - 1
    assert ones & fixed == (0x4000 << 64) | (0x8000 << 48)


def test_encode_gives_fresh_uuid4_ids_and_the_json_body_pydantic_gives() -> None:
    jobs = [
        SendWelcomeEmail(user_id="42", email="ada@example.com", name="Ada", locale="pt-BR"),
        GenerateReport(account_id="acme", month="2025-01", format="csv"),
    ]
    for job in jobs:
        message = encode(job, source="/s")
        assert uuid.UUID(message.attributes.id).version == 4
        assert message.body == job.model_dump_json(by_alias=True).encode()


optional = st.none() | st.sampled_from(["v", "é€", ORIGIN])


@settings(max_examples=300, deadline=None)
@given(
    subject=optional,
    dataschema=optional,
    key=optional,
    idempotency_key=optional,
    not_before=st.none() | st.just(TIME),
    traceparent=optional,
    tracestate=optional,
    origin_traceparent=optional,
    origin_tracestate=optional,
    version=st.sampled_from([1, 99, 100, 12345]),
    extensions=st.sampled_from([{}, {"b": "2", "a": "1"}]),
)
def test_both_bindings_write_the_wire_order(**given: Any) -> None:
    attrs = JobAttributes(id="j", type="t", source="s", time=TIME, **given)
    values = wire_values(attrs)
    ordered = [
        (name, value)
        for name, value in zip(header_names("ce_", "content-type"), values, strict=True)
        if value is not None
    ]
    ordered += [("ce_" + name, value) for name, value in attrs.extensions.items()]
    key, headers = to_kafka(attrs)
    assert headers == [(name, value.encode()) for name, value in ordered]
    assert key == (None if attrs.key is None else attrs.key.encode())
    nats = [
        (name, value)
        for name, value in zip(header_names("ce-", "Content-Type"), values, strict=True)
        if value is not None
    ]
    nats += [("ce-" + name, value) for name, value in attrs.extensions.items()]
    nats += [("ce-partitionkey", attrs.key)] if attrs.key is not None else []
    assert list(to_nats(attrs).items()) == [*nats, ("Nats-Msg-Id", "j")]


@settings(max_examples=500, deadline=None)
@given(
    moment=st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from([UTC, timezone(timedelta(0)), PLUS_TWO]),
    )
)
def test_times_are_written_as_isoformat_writes_them(moment: datetime) -> None:
    expected = moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds")
    assert format_time(moment) == expected + "Z"
    assert parse_time(format_time(moment)) == moment


def test_encode_puts_every_option_in_its_attribute() -> None:
    job = GenerateReport(account_id="acme", month="2025-01")
    options: dict[str, Any] = {
        "id": "the-id",
        "key": "the-key",
        "time": TIME,
        "idempotency_key": "the-idempotency-key",
        "not_before": TIME + timedelta(hours=1),
        "subject": "the-subject",
        "traceparent": TRACEPARENT,
        "tracestate": "the=state",
        "origin_traceparent": ORIGIN,
        "origin_tracestate": "the=origin",
    }
    attrs = encode(job, source="the-source", **options).attributes
    assert {name: getattr(attrs, name) for name in options} == options
    assert (attrs.type, attrs.version, attrs.source, attrs.attempt) == (
        "report.generate",
        1,
        "the-source",
        1,
    )
    assert (attrs.dataschema, attrs.content_type) == (
        "urn:jobstream:schema:report.generate:v1",
        "application/json",
    )
    assert not attrs.extensions
