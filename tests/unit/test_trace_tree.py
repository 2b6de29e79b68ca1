"""examples/trace_tree.py on a trace shaped as Jaeger's API returns it (the demo test runs
it against a real Jaeger): parents from CHILD_OF, links from FOLLOWS_FROM, roles."""

from __future__ import annotations

from typing import Any

from examples.trace_tree import draw, spans_of


def span(
    span_id: str,
    name: str,
    start: int,
    kind: str,
    parent: str | None,
    *links: str,
    tags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    references = [{"refType": "CHILD_OF", "spanID": parent}] if parent else []
    references += [{"refType": "FOLLOWS_FROM", "spanID": link} for link in links]
    tag_list = [{"key": "span.kind", "value": kind}]
    tag_list += [{"key": key, "value": value} for key, value in (tags or {}).items()]
    return {
        "spanID": span_id,
        "operationName": name,
        "processID": "p1" if span_id in ("a", "b") else "p2",
        "startTime": start,
        "duration": 1500,
        "references": references,
        "tags": tag_list,
    }


def test_a_retried_job_is_drawn_as_its_story() -> None:
    trace = {
        "processes": {"p1": {"serviceName": "ingress"}, "p2": {"serviceName": "worker"}},
        "spans": [
            # Out of order, as Jaeger may return them.
            span(
                "e",
                "process t.retry.1",
                5,
                "consumer",
                "d",
                "a",
                "c",
                tags={"jobstream.job.attempt": 2, "jobstream.job.outcome": "completed"},
            ),
            span("a", "POST /v1/jobs/t", 1, "server", None),
            span(
                "c",
                "process t",
                3,
                "consumer",
                "b",
                "a",
                tags={
                    "jobstream.job.attempt": 1,
                    "otel.status_code": "ERROR",
                    "otel.status_description": "Retry: <later>",
                },
            ),
            span("b", "send t", 2, "producer", "a", tags={"messaging.destination.name": "t"}),
            span(
                "d",
                "send t.retry.1",
                4,
                "producer",
                "c",
                "a",
                tags={"messaging.destination.name": "t.retry.1"},
            ),
        ],
    }
    assert draw(spans_of(trace)) == [
        "POST /v1/jobs/t  [ingress]  1.5 ms  request",
        "└─ send t  [ingress]  1.5 ms  publish",
        "   └─ process t  [worker]  1.5 ms  attempt 1 failed: Retry: <later>"
        "  (links: POST /v1/jobs/t)",
        "      └─ send t.retry.1  [worker]  1.5 ms  retry hand-off  (links: POST /v1/jobs/t)",
        "         └─ process t.retry.1  [worker]  1.5 ms  attempt 2 completed"
        "  (links: POST /v1/jobs/t, process t)",
    ]


def test_siblings_and_a_missing_parent() -> None:
    trace = {
        "processes": {"p1": {"serviceName": "s"}, "p2": {"serviceName": "s"}},
        "spans": [
            span("a", "root", 1, "server", None),
            span("x", "one", 2, "consumer", "a", tags={"jobstream.job.attempt": 1}),
            span("y", "two", 3, "consumer", "a", tags={"jobstream.job.attempt": 2}),
            span("z", "orphan", 4, "internal", "gone"),
        ],
    }
    assert draw(spans_of(trace)) == [
        "root  [s]  1.5 ms  request",
        "├─ one  [s]  1.5 ms  attempt 1 done",
        "└─ two  [s]  1.5 ms  attempt 2 done",
        "orphan  [s]  1.5 ms  internal",
    ]
