"""The wire contract: exact Kafka and NATS headers, strict parsing, size limits."""

import pickle
from datetime import UTC, datetime, timedelta, timezone

import pytest

from schemas import (
    MAX_HEADER_BYTES,
    InvalidAttributes,
    JobAttributes,
    from_kafka,
    from_nats,
    header_bytes,
    to_kafka,
    to_nats,
)

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


def test_minimal_kafka_headers_are_exactly_the_documented_set() -> None:
    key, headers = to_kafka(MINIMAL)
    assert key is None
    assert headers == [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"job-1"),
        ("ce_type", b"email.welcome"),
        ("ce_source", b"/signup"),
        ("ce_time", b"2025-01-31T09:30:00.123456Z"),
        ("content-type", b"application/json"),
        ("ce_jobversion", b"1"),
        ("ce_jobattempt", b"1"),
    ]


def test_full_kafka_headers_are_exactly_the_documented_set_in_order() -> None:
    key, headers = to_kafka(FULL)
    assert key == b"user-42"  # the ordering key is the record key, not a header
    assert headers == [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"job-1"),
        ("ce_type", b"email.welcome"),
        ("ce_source", b"/signup"),
        ("ce_time", b"2025-01-31T09:30:00.123456Z"),
        ("ce_subject", b"user/42"),
        ("ce_dataschema", b"urn:jobstream:schema:email.welcome:v2"),
        ("content-type", b"application/json"),
        ("traceparent", TRACEPARENT.encode()),
        ("tracestate", b"vendor=1"),
        ("ce_jobversion", b"2"),
        ("ce_jobattempt", b"3"),
        ("ce_jobidemkey", b"welcome-42"),
        ("ce_jobnotbefore", b"2025-01-31T09:35:00.123456Z"),
        ("ce_joborigin", ORIGIN.encode()),
        ("ce_joboriginstate", b"vendor=0"),
        ("ce_alpha", b"a"),
        ("ce_zeta", b"z"),
    ]


def test_full_nats_headers_are_exactly_the_documented_set() -> None:
    assert to_nats(FULL) == {
        "ce-specversion": "1.0",
        "ce-id": "job-1",
        "ce-type": "email.welcome",
        "ce-source": "/signup",
        "ce-time": "2025-01-31T09:30:00.123456Z",
        "ce-subject": "user/42",
        "ce-dataschema": "urn:jobstream:schema:email.welcome:v2",
        "Content-Type": "application/json",
        "traceparent": TRACEPARENT,
        "tracestate": "vendor=1",
        "ce-jobversion": "2",
        "ce-jobattempt": "3",
        "ce-jobidemkey": "welcome-42",
        "ce-jobnotbefore": "2025-01-31T09:35:00.123456Z",
        "ce-joborigin": ORIGIN,
        "ce-joboriginstate": "vendor=0",
        "ce-alpha": "a",
        "ce-zeta": "z",
        "ce-partitionkey": "user-42",
        "Nats-Msg-Id": "job-1",
    }


@pytest.mark.parametrize("attrs", [MINIMAL, FULL], ids=["minimal", "full"])
def test_both_bindings_round_trip(attrs: JobAttributes) -> None:
    assert from_kafka(*to_kafka(attrs)) == attrs
    assert from_nats(to_nats(attrs)) == attrs


def test_unknown_ce_headers_are_preserved_as_extensions_and_written_back() -> None:
    key, headers = to_kafka(MINIMAL)
    headers += [("ce_failreason", b"timeout"), ("x-other", b"\xff"), ("b3", b"1")]
    attrs = from_kafka(key, headers)
    assert dict(attrs.extensions) == {"failreason": "timeout"}
    assert ("ce_failreason", b"timeout") in to_kafka(attrs)[1]
    assert all(name != "x-other" for name, _ in to_kafka(attrs)[1])


def test_nats_names_are_case_insensitive_and_other_headers_ignored() -> None:
    headers = {k.upper(): v for k, v in to_nats(FULL).items()}
    headers["Nats-Expected-Stream"] = "JOBS"
    assert from_nats(headers) == FULL


def test_defaults_apply_when_optional_headers_are_absent() -> None:
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"j"),
        ("ce_type", b"t"),
        ("ce_source", b"s"),
        ("ce_time", b"2025-01-31T10:30:00+01:00"),
    ]
    attrs = from_kafka(b"", headers)
    assert (attrs.version, attrs.attempt, attrs.content_type) == (1, 1, "application/json")
    assert attrs.key is None  # an empty record key is no ordering key
    assert attrs.time == datetime(2025, 1, 31, 9, 30, tzinfo=UTC)
    assert attrs.time.tzinfo is UTC


def test_an_empty_idempotency_key_header_means_none() -> None:
    key, headers = to_kafka(MINIMAL)
    attrs = from_kafka(key, [*headers, ("ce_jobidemkey", b"")])
    assert attrs.idempotency_key is None
    assert attrs.dedup_key == "job-1"


def test_a_nats_partitionkey_or_kafka_fallback_header_is_the_key() -> None:
    _, headers = to_kafka(MINIMAL)
    assert from_kafka(None, [*headers, ("ce_partitionkey", b"k")]).key == "k"
    assert from_kafka(b"record", [*headers, ("ce_partitionkey", b"k")]).key == "record"


def test_a_cloudevents_sdk_traceparent_extension_is_accepted() -> None:
    key, headers = to_kafka(MINIMAL)
    attrs = from_kafka(key, [*headers, ("ce_traceparent", TRACEPARENT.encode())])
    assert attrs.traceparent == TRACEPARENT
    assert not attrs.extensions


def drop(headers: list[tuple[str, bytes]], name: str) -> list[tuple[str, bytes]]:
    return [(n, v) for n, v in headers if n != name]


def replace(headers: list[tuple[str, bytes]], name: str, value: bytes) -> list[tuple[str, bytes]]:
    return [(n, value if n == name else v) for n, v in headers]


BASE_KEY, BASE = to_kafka(FULL)


@pytest.mark.parametrize(
    ("headers", "match"),
    [
        (drop(BASE, "ce_id"), "missing required header ce_id"),
        (drop(BASE, "ce_type"), "missing required header ce_type"),
        (drop(BASE, "ce_source"), "missing required header ce_source"),
        (drop(BASE, "ce_time"), "missing required header ce_time"),
        (drop(BASE, "ce_specversion"), "missing required header ce_specversion"),
        (replace(BASE, "ce_id", b""), "missing required header ce_id"),
        (replace(BASE, "ce_specversion", b"0.3"), "reads 1.0 only"),
        (replace(BASE, "ce_time", b"yesterday"), "not an RFC 3339 timestamp"),
        (replace(BASE, "ce_time", b"2025-01-31 09:30:00Z"), "not an RFC 3339"),
        (replace(BASE, "ce_time", b"2025-01-31T09:30:00"), "not an RFC 3339"),
        (replace(BASE, "ce_time", b"2025-02-30T09:30:00Z"), "not an RFC 3339"),
        (replace(BASE, "ce_jobnotbefore", b"soon"), "ce_jobnotbefore"),
        (replace(BASE, "ce_jobversion", b"two"), "ce_jobversion='two' must be a positive"),
        (replace(BASE, "ce_jobversion", b"1_0"), "must be a positive decimal integer"),
        (replace(BASE, "ce_jobattempt", b"0"), "ce_jobattempt='0'"),
        (replace(BASE, "ce_jobattempt", b"-1"), "ce_jobattempt"),
        (replace(BASE, "ce_source", b"\xff\xfe"), "header 'ce_source' is not UTF-8"),
        ([*BASE, ("ce_id", b"job-2")], "'ce_id' appears twice with different values"),
        ([*BASE, ("ce_bad_name", b"x")], "extension name 'bad_name' is not allowed"),
        (replace(BASE, "ce_subject", b"a\r\nInjected: 1"), "without control characters"),
        (
            replace(BASE, "content-type", b"application/cloudevents+json"),
            "structured mode",
        ),
    ],
)
def test_untrusted_kafka_headers_raise_invalid_attributes(
    headers: list[tuple[str, bytes]], match: str
) -> None:
    with pytest.raises(InvalidAttributes, match=match):
        from_kafka(BASE_KEY, headers)


def test_a_non_utf8_record_key_is_invalid() -> None:
    with pytest.raises(InvalidAttributes, match="record key is not UTF-8"):
        from_kafka(b"\xff", BASE)


def test_missing_nats_headers_raise_invalid_attributes() -> None:
    with pytest.raises(InvalidAttributes, match="missing required header ce-specversion"):
        from_nats(None)


def test_rfc3339_variants_from_other_producers_are_accepted() -> None:
    for text, expected in [
        (b"2025-01-31T09:30:00Z", datetime(2025, 1, 31, 9, 30, tzinfo=UTC)),
        (b"2025-01-31t09:30:00.5z", datetime(2025, 1, 31, 9, 30, 0, 500000, tzinfo=UTC)),
        (b"2025-01-31T09:30:00.123456789Z", datetime(2025, 1, 31, 9, 30, 0, 123456, tzinfo=UTC)),
        (b"2025-01-31T04:00:00-05:30", datetime(2025, 1, 31, 9, 30, tzinfo=UTC)),
    ]:
        assert from_kafka(None, replace(BASE, "ce_time", text)).time == expected


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"id": ""}, "'id' must be a non-empty string"),
        ({"time": datetime(2025, 1, 1)}, "'time' must be a timezone-aware"),
        ({"not_before": datetime(2025, 1, 1)}, "'not_before' must be"),
        ({"version": 0}, "'version' must be an int >= 1"),
        ({"attempt": True}, "'attempt' must be an int >= 1"),
        ({"key": ""}, "'key' must be None or non-empty"),
        ({"idempotency_key": ""}, "'idempotency_key' must be None or non-empty"),
        ({"extensions": {"jobattempt": "2"}}, "must not repeat a known attribute"),
        ({"extensions": {"Upper": "x"}}, "lowercase letters and digits"),
        ({"extensions": {"ok": "line\nbreak"}}, "without control characters"),
        ({"subject": "\ud800"}, "without control characters"),
    ],
)
def test_attributes_are_valid_by_construction(changes: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidAttributes, match=match):
        MINIMAL.replace(**changes)


def test_times_are_normalised_to_utc() -> None:
    local = TIME.astimezone(timezone(timedelta(hours=2)))
    attrs = MINIMAL.replace(time=local)
    assert attrs.time.tzinfo is UTC
    assert attrs == MINIMAL


def test_dedup_key_is_the_idempotency_key_else_the_id() -> None:
    assert MINIMAL.dedup_key == "job-1"
    assert MINIMAL.replace(idempotency_key="k").dedup_key == "k"


def test_extension_helpers_return_new_validated_copies() -> None:
    failed = MINIMAL.with_extensions(jobfailreason="timeout", jobfailcount="2")
    assert dict(failed.extensions) == {"jobfailcount": "2", "jobfailreason": "timeout"}
    assert not MINIMAL.extensions
    assert dict(failed.with_extensions(jobfailcount=None).extensions) == {
        "jobfailreason": "timeout"
    }
    assert failed.without_extensions("jobfail") == MINIMAL
    with pytest.raises(InvalidAttributes):
        MINIMAL.with_extensions(jobversion="9")


def test_extensions_are_immutable_and_attributes_hashable_and_picklable() -> None:
    source = {"a": "1"}
    attrs = MINIMAL.replace(extensions=source)
    source["a"] = "2"
    assert attrs.extensions["a"] == "1"
    with pytest.raises(TypeError):
        attrs.extensions["a"] = "3"  # type: ignore[index]
    assert hash(attrs) == hash(MINIMAL.replace(extensions={"a": "1"}))
    assert pickle.loads(pickle.dumps(FULL)) == FULL


def test_header_size_is_bounded() -> None:
    assert 0 < header_bytes(FULL) < 1024
    just_fits = MINIMAL.replace(subject="x" * (MAX_HEADER_BYTES - header_bytes(MINIMAL) - 40))
    to_kafka(just_fits)
    to_nats(just_fits)
    too_big = MINIMAL.with_extensions(jobfailtrace="x" * MAX_HEADER_BYTES)
    assert header_bytes(too_big) > MAX_HEADER_BYTES
    with pytest.raises(InvalidAttributes, match=r"exceed the limit of 16384.*'jobfailtrace'"):
        to_kafka(too_big)
    with pytest.raises(InvalidAttributes, match="exceed the limit"):
        to_nats(too_big)


def test_nats_headers_are_larger_than_kafka_ones_and_both_are_counted() -> None:
    key, headers = to_kafka(FULL)
    kafka_size = len(key or b"") + sum(len(n) + len(v) for n, v in headers)
    nats_size = sum(len(n) + len(v) for n, v in to_nats(FULL).items())
    assert header_bytes(FULL) == max(kafka_size, nats_size)
