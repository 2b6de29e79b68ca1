"""What an outbox row fixes at insert (issue 18): the job id, the CloudEvents headers in
binary mode and the trace context, so that the relay's publish (and a re-publish after a
crash) carries exactly what the caller's transaction wrote. No database: `Outbox.row`."""

from __future__ import annotations

import json

import pytest
from opentelemetry.sdk.trace import TracerProvider

from producer import ProducerSettings
from producer.outbox import Outbox
from schemas import from_kafka
from schemas.examples import SendWelcomeEmail

JOB = SendWelcomeEmail(user_id="42", email="a@example.com", name="Ada")


def test_the_row_holds_the_job_as_the_producer_would_publish_it() -> None:
    outbox = Outbox(ProducerSettings(source="/shop"), table="shop_outbox")
    job_id, destination, key, headers, body = outbox.row(JOB, key="user-42", id="job-1")
    assert (job_id, destination, key) == ("job-1", "jobs.email.welcome", "user-42")
    attributes = from_kafka(key.encode(), [(n, v.encode()) for n, v in json.loads(headers)])
    assert (attributes.id, attributes.type, attributes.source) == (
        "job-1",
        "email.welcome",
        "/shop",
    )
    assert json.loads(body) == JOB.model_dump(mode="json")
    assert outbox.row(JOB)[0] != outbox.row(JOB)[0], "a fresh id per job unless one is given"


def test_the_trace_context_is_fixed_at_insert_under_a_create_span() -> None:
    provider = TracerProvider()
    outbox = Outbox(ProducerSettings(), tracer_provider=provider)
    with provider.get_tracer("test").start_as_current_span("POST /orders") as request:
        _, _, _, headers, _ = outbox.row(JOB)
    named = dict(json.loads(headers))
    trace_id = format(request.get_span_context().trace_id, "032x")
    assert named["traceparent"].split("-")[1] == trace_id  # the create span, in the request's trace
    attributes = from_kafka(None, [(n, v.encode()) for n, v in named.items()])
    assert attributes.origin_traceparent is not None
    assert attributes.origin_traceparent.split("-")[2] == format(
        request.get_span_context().span_id, "016x"
    ), "the origin is the caller's span"


def test_bad_tables_and_options_fail_before_anything_is_written() -> None:
    with pytest.raises(ValueError, match="plain SQL identifier"):
        Outbox(ProducerSettings(), table="orders; DROP TABLE x")
    outbox = Outbox(ProducerSettings())
    with pytest.raises(ValueError, match="delay"):
        outbox.row(JOB, delay=-1)
    with pytest.raises(ValueError, match="priorit"):
        outbox.row(JOB, priority="high")
