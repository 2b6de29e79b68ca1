"""Issue 13, K8: trace context is best-effort. A repeated, malformed or unreadable
`traceparent` is ignored (the first good one wins), never a reason to refuse a job, on both
bindings; the job's own attributes are still strict."""

from __future__ import annotations

import pytest

from schemas import InvalidAttributes, from_kafka, from_nats

FIRST = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SECOND = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
KAFKA = [
    ("ce_specversion", b"1.0"),
    ("ce_id", b"job-1"),
    ("ce_type", b"report.generate"),
    ("ce_source", b"/tests"),
    ("ce_time", b"2026-11-29T10:00:00Z"),
]


def test_two_different_traceparents_keep_the_first_instead_of_refusing_the_job() -> None:
    # What OpenTelemetry's aiokafka instrumentation adds to a record jobstream also traced.
    headers = [*KAFKA, ("traceparent", FIRST.encode()), ("traceparent", SECOND.encode())]
    attributes = from_kafka(None, headers)
    assert (attributes.id, attributes.traceparent) == ("job-1", FIRST)


@pytest.mark.parametrize(
    "value",
    [b"garbage", b"00-" + b"0" * 32 + b"-b7ad6b7169203331-01", b"\xff\xfe", b"00-abc\n-01"],
    ids=["malformed", "all-zero-trace-id", "not-utf8", "control-character"],
)
def test_an_unusable_traceparent_is_dropped_with_its_tracestate(value: bytes) -> None:
    headers = [*KAFKA, ("traceparent", value), ("tracestate", b"vendor=1")]
    attributes = from_kafka(None, headers)
    assert (attributes.traceparent, attributes.tracestate) == (None, None)


def test_an_unusable_origin_is_dropped_and_a_good_traceparent_kept() -> None:
    headers = [
        *KAFKA,
        ("traceparent", FIRST.encode()),
        ("ce_joborigin", b"not a traceparent"),
        ("ce_joborigin", SECOND.encode()),
    ]
    attributes = from_kafka(None, headers)
    assert (attributes.traceparent, attributes.origin_traceparent) == (FIRST, None)


def test_a_too_long_tracestate_is_dropped_alone() -> None:
    headers = [*KAFKA, ("traceparent", FIRST.encode()), ("tracestate", b"k=" + b"v" * 600)]
    attributes = from_kafka(None, headers)
    assert (attributes.traceparent, attributes.tracestate) == (FIRST, None)


def test_nats_drops_a_malformed_traceparent_too() -> None:
    headers = {name.replace("ce_", "ce-"): value.decode() for name, value in KAFKA}
    attributes = from_nats({**headers, "traceparent": "garbage", "tracestate": "a=b"})
    assert (attributes.id, attributes.traceparent, attributes.tracestate) == ("job-1", None, None)


def test_the_jobs_own_attributes_stay_strict() -> None:
    with pytest.raises(InvalidAttributes, match="ce_id"):
        from_kafka(None, [*KAFKA, ("ce_id", b"job-2")])
