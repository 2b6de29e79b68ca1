"""encode/decode: round trips through both bindings, strict decoding, typed errors."""

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    InvalidPayload,
    Job,
    JobAttributes,
    JobMessage,
    JobRegistry,
    UndecodableBody,
    UnknownJobType,
    UnsupportedVersion,
    decode,
    encode,
    from_kafka,
    from_nats,
    to_kafka,
    to_nats,
    validate_payload,
)
from schemas.examples import GenerateReport, ResizeImage, SendWelcomeEmail, SendWelcomeEmailV2

REGISTRY = JobRegistry([SendWelcomeEmail, SendWelcomeEmailV2, ResizeImage, GenerateReport])
EXAMPLES: list[Job] = [
    SendWelcomeEmail(user_id="42", email="ada@example.com", name="Ada", locale="pt-BR"),
    SendWelcomeEmailV2(user_id="42", email="ada@example.com", name="Ada", marketing_opt_in=True),
    ResizeImage(
        upload_id="up-7",
        source_url="https://cdn.example.com/u/7.png",
        width=640,
        height=480,
        format="jpeg",
    ),
    GenerateReport(account_id="acme", month="2025-01", format="csv"),
]
TIME = datetime(2025, 1, 31, 9, 30, tzinfo=UTC)


def kafka_trip(message: JobMessage) -> JobMessage:
    key, headers = to_kafka(message.attributes)
    return JobMessage(from_kafka(key, headers), message.body)


def nats_trip(message: JobMessage) -> JobMessage:
    return JobMessage(from_nats(to_nats(message.attributes)), message.body)


@pytest.mark.parametrize("job", EXAMPLES, ids=lambda job: type(job).__name__)
@pytest.mark.parametrize("trip", [kafka_trip, nats_trip], ids=["kafka", "nats"])
def test_every_example_round_trips(job: Job, trip: Any) -> None:
    message = encode(
        job,
        source="/tests",
        key="k-1",
        idempotency_key="idem-1",
        not_before=TIME + timedelta(seconds=30),
        subject="user/42",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    decoded = decode(trip(message), REGISTRY)
    assert decoded.job == job
    assert type(decoded.job) is type(job)
    assert decoded.attributes == message.attributes


def test_encode_sets_the_contract_attributes_and_a_compact_body() -> None:
    job = EXAMPLES[0]
    message = encode(
        job, source="/signup", id="job-1", time=TIME, traceparent="tp", tracestate="ts"
    )
    attrs = message.attributes
    assert (attrs.id, attrs.type, attrs.version, attrs.source) == (
        "job-1",
        "email.welcome",
        1,
        "/signup",
    )
    assert attrs.dataschema == "urn:jobstream:schema:email.welcome:v1"
    assert attrs.content_type == "application/json"
    assert (attrs.origin_traceparent, attrs.origin_tracestate) == ("tp", "ts")
    assert message.body == (
        b'{"user_id":"42","email":"ada@example.com","name":"Ada","locale":"pt-BR"}'
    )
    assert json.loads(message.body) == job.model_dump(mode="json")


def test_encode_defaults_a_fresh_id_and_the_current_time() -> None:
    first = encode(EXAMPLES[0], source="/s").attributes
    second = encode(EXAMPLES[0], source="/s").attributes
    assert first.id != second.id
    assert len(first.id) == 36
    assert abs(first.time - datetime.now(UTC)) < timedelta(minutes=1)


def test_an_explicit_origin_is_kept() -> None:
    attrs = encode(EXAMPLES[0], source="/s", traceparent="now", origin_traceparent="then")
    assert (attrs.attributes.traceparent, attrs.attributes.origin_traceparent) == ("now", "then")


def test_encoding_an_abstract_job_is_a_type_error() -> None:
    class Abstract(Job):
        pass

    with pytest.raises(TypeError, match="has no job type"):
        encode(Abstract(), source="/s")


def message_with(body: bytes, **changes: Any) -> JobMessage:
    attrs = JobAttributes(id="j", type="email.welcome", source="/s", time=TIME)
    return JobMessage(attrs.replace(**changes), body)


VALID = b'{"user_id":"42","email":"ada@example.com","name":"Ada"}'


@pytest.mark.parametrize(
    ("message", "error", "match"),
    [
        (message_with(VALID, type="email.welcom"), UnknownJobType, "'email.welcom'"),
        (message_with(VALID, version=7), UnsupportedVersion, r"supported: v1, v2"),
        (message_with(b"\xff\xfe{}"), UndecodableBody, "not UTF-8"),
        (message_with(b"{not json"), UndecodableBody, "not valid JSON"),
        (message_with(b""), UndecodableBody, "not valid JSON"),
        (message_with(b"[1, 2]"), UndecodableBody, "not an object"),
        (message_with(b'"text"'), UndecodableBody, "not an object"),
        (message_with(VALID, content_type="text/plain"), UndecodableBody, "'text/plain'"),
        (
            message_with(b'{"user_id":"42","email":"nope","name":"Ada"}'),
            InvalidPayload,
            "email.welcome v1: field 'email': value is not a valid email address",
        ),
        (
            message_with(b'{"user_id":"42","name":"Ada","extra":1}'),
            InvalidPayload,
            "field 'email': Field required; field 'extra': Extra inputs are not permitted",
        ),
        (
            message_with(VALID, version=2),
            InvalidPayload,
            "email.welcome v2: field 'marketing_opt_in': Field required",
        ),
    ],
)
def test_each_decode_error_is_raised_for_its_input(
    message: JobMessage, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        decode(message, REGISTRY)


def test_content_type_parameters_and_json_suffixes_are_json() -> None:
    for content_type in ("application/json; charset=utf-8", "application/vnd.acme+json"):
        assert decode(message_with(VALID, content_type=content_type), REGISTRY).job


@pytest.mark.parametrize(
    ("model", "payload", "field"),
    [
        (ResizeImage, {"width": "640"}, "width"),  # a numeric string is not an int
        (ResizeImage, {"width": 640.5}, "width"),
        (ResizeImage, {"width": 0}, "width"),
        (ResizeImage, {"width": 9000}, "width"),
        (ResizeImage, {"format": "gif"}, "format"),
        (ResizeImage, {"source_url": "ftp://x/y"}, "source_url"),
        (GenerateReport, {"month": "2025-13"}, "month"),
        (GenerateReport, {"month": 202501}, "month"),
        (SendWelcomeEmailV2, {"marketing_opt_in": 1}, "marketing_opt_in"),  # 1 is not a bool
        (SendWelcomeEmailV2, {"marketing_opt_in": "true"}, "marketing_opt_in"),
        (SendWelcomeEmail, {"locale": "english"}, "locale"),
    ],
)
def test_decoding_is_strict(model: type[Job], payload: dict[str, Any], field: str) -> None:
    example = next(job for job in EXAMPLES if type(job) is model)
    body = json.dumps({**example.model_dump(mode="json"), **payload}).encode()
    message = encode(example, source="/s")
    with pytest.raises(InvalidPayload, match=f"field '{field}'") as info:
        decode(JobMessage(message.attributes, body), REGISTRY)
    assert [error["loc"] for error in info.value.errors] == [(field,)]
    assert "input" not in info.value.errors[0]  # payload values stay out of errors


def test_validate_payload_accepts_what_decode_accepts() -> None:
    data = {"account_id": "acme", "month": "2025-01"}
    assert validate_payload(GenerateReport, data) == GenerateReport(**data)
    assert validate_payload(GenerateReport, json.dumps(data)).format == "pdf"
    assert validate_payload(GenerateReport, json.dumps(data).encode()).month == "2025-01"


def test_validate_payload_raises_typed_errors_naming_fields() -> None:
    with pytest.raises(InvalidPayload, match=r"report\.generate v1: field 'month'"):
        validate_payload(GenerateReport, {"account_id": "acme", "month": "Jan"})
    with pytest.raises(InvalidPayload, match="field 'width'"):
        validate_payload(
            ResizeImage, '{"upload_id":"u","source_url":"https://x.io/a","width":"42","height":1}'
        )
    with pytest.raises(UndecodableBody, match="not JSON-serializable"):
        validate_payload(GenerateReport, {"account_id": "acme", "month": datetime.now(UTC)})
    with pytest.raises(UndecodableBody, match="not valid JSON"):
        validate_payload(GenerateReport, "month=2025-01")


ids = st.text(st.characters(min_codepoint=0x20, exclude_categories=("Cs", "Cc")), min_size=1)


@settings(max_examples=75, deadline=None)
@given(
    job=st.builds(
        GenerateReport,
        account_id=st.text(min_size=1, max_size=64),
        month=st.from_regex(r"\A[0-9]{4}-(0[1-9]|1[0-2])\Z"),
        format=st.sampled_from(["pdf", "csv"]),
    ),
    id_=ids,
    source=ids,
    key=st.none() | ids,
    time=st.datetimes(timezones=st.just(UTC)),
    attempt=st.integers(1, 10**6),
    extensions=st.dictionaries(st.from_regex(r"\Ax[a-z0-9]{0,10}\Z"), ids, max_size=3),
)
def test_round_trip_property(
    job: GenerateReport,
    id_: str,
    source: str,
    key: str | None,
    time: datetime,
    attempt: int,
    extensions: dict[str, str],
) -> None:
    message = encode(job, source=source, id=id_, key=key, time=time)
    attrs = message.attributes.replace(attempt=attempt, extensions=extensions)
    for trip in (kafka_trip, nats_trip):
        decoded = decode(trip(JobMessage(attrs, message.body)), REGISTRY)
        assert decoded.job == job
        assert decoded.attributes == attrs
