"""Read a trace back from Jaeger's HTTP API and draw it as an indented tree.

`make demo` ends with the retried job's trace drawn this way: the HTTP request, the
publish, attempt 1 (failed), the hand-off to the retry tier, attempt 2 (succeeded), each
with its service, its duration and the spans it links to (OpenTelemetry span links,
Jaeger's FOLLOWS_FROM references). Parents are the CHILD_OF references; spans whose parent
is not in the trace (yet) are drawn as roots. Run it on its own:

    python -m examples.trace_tree TRACE_ID [--jaeger http://127.0.0.1:16686]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Span", "draw", "fetch_trace", "spans_of", "wait_for_trace"]

JAEGER = "http://127.0.0.1:16686"


@dataclass
class Span:
    span_id: str
    name: str
    service: str
    start_us: int
    duration_us: int
    tags: dict[str, Any]
    parent: str | None
    links: list[str]
    children: list[Span] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.tags.get("otel.status_code") == "ERROR" or self.tags.get("error") is True

    def role(self) -> str:
        """What the span is, in the words of the job's story."""
        kind = self.tags.get("span.kind")
        destination = str(self.tags.get("messaging.destination.name", ""))
        if kind == "server":
            return "request"
        if kind == "producer":
            return "retry hand-off" if ".retry." in destination else "publish"
        if kind == "consumer" and "jobstream.job.attempt" in self.tags:
            attempt = self.tags["jobstream.job.attempt"]
            outcome = self.tags.get("jobstream.job.outcome")
            verdict = "failed" if self.failed else (outcome or "done")
            return f"attempt {attempt} {verdict}"
        return str(kind or "internal")


def fetch_trace(jaeger: str, trace_id: str) -> dict[str, Any] | None:
    """The trace as Jaeger's query API returns it, or None while it is not stored."""
    if not jaeger.startswith(("http://", "https://")):
        msg = f"Jaeger's URL must be http(s)://..., not {jaeger!r}"
        raise ValueError(msg)
    url = f"{jaeger.rstrip('/')}/api/traces/{trace_id}"
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 - http(s) only
            data = json.loads(answer.read()).get("data") or []
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise
    return data[0] if data else None


def spans_of(trace: dict[str, Any]) -> list[Span]:
    """The trace's spans, linked into trees (roots returned, oldest first)."""
    services = {key: process["serviceName"] for key, process in trace["processes"].items()}
    spans: dict[str, Span] = {}
    for raw in trace["spans"]:
        references = raw.get("references") or []
        parents = [ref["spanID"] for ref in references if ref["refType"] == "CHILD_OF"]
        spans[raw["spanID"]] = Span(
            span_id=raw["spanID"],
            name=raw["operationName"],
            service=services.get(raw["processID"], "?"),
            start_us=raw["startTime"],
            duration_us=raw["duration"],
            tags={tag["key"]: tag["value"] for tag in raw.get("tags", [])},
            parent=parents[0] if parents else None,
            links=[ref["spanID"] for ref in references if ref["refType"] == "FOLLOWS_FROM"],
        )
    roots = []
    for span in sorted(spans.values(), key=lambda s: s.start_us):
        parent = spans.get(span.parent) if span.parent else None
        if parent is None:
            roots.append(span)
        else:
            parent.children.append(span)
    return roots


def wait_for_trace(
    jaeger: str,
    trace_id: str,
    complete: Callable[[list[Span]], bool],
    timeout_s: float = 30.0,
) -> list[Span]:
    """Poll Jaeger until the trace's spans satisfy `complete` (spans arrive in batches
    from several processes); after `timeout_s`, what arrived (maybe incomplete)."""
    deadline = time.monotonic() + timeout_s
    roots: list[Span] = []
    while True:
        trace = fetch_trace(jaeger, trace_id)
        roots = spans_of(trace) if trace else []
        if (roots and complete(roots)) or time.monotonic() > deadline:
            return roots
        time.sleep(0.5)


def walk(roots: list[Span]) -> list[Span]:
    found: list[Span] = []
    for root in roots:
        found.append(root)
        found.extend(walk(root.children))
    return found


def draw(roots: list[Span]) -> list[str]:
    """The tree as lines: `name  [service]  duration  role  (links: ...)`."""
    names = {span.span_id: span.name for span in walk(roots)}
    lines: list[str] = []

    def add(span: Span, prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└─ " if last else "├─ ")
        text = f"{prefix}{branch}{span.name}  [{span.service}]  {span.duration_us / 1000:.1f} ms"
        text += f"  {span.role()}"
        why = span.tags.get("otel.status_description")
        if span.failed and why:
            text += f": {str(why)[:80]}"
        if span.links:
            linked = ", ".join(names.get(link, f"span {link}") for link in span.links)
            text += f"  (links: {linked})"
        lines.append(text)
        inner = prefix + ("" if top else ("   " if last else "│  "))
        for index, child in enumerate(span.children):
            add(child, inner, index == len(span.children) - 1, top=False)

    for root in roots:
        add(root, "", last=True, top=True)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("trace_id")
    parser.add_argument("--jaeger", default=JAEGER)
    args = parser.parse_args()
    trace = fetch_trace(args.jaeger, args.trace_id)
    if trace is None:
        print(f"no trace {args.trace_id} in {args.jaeger}", file=sys.stderr)
        return 1
    print("\n".join(draw(spans_of(trace))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
