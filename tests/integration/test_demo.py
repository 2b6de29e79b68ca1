"""`make demo` is the README's first command: its script must pass against the real stack.

The test runs the demo script itself (what `make demo` runs between `make up` and
`make down`), so the shared brokers of the test session stay up, with Jaeger as `make
demo` runs it: the retried job's trace is read back from Jaeger's API and drawn as a tree
(`examples/trace_tree.py`), which this test checks line by line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.support import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

JAEGER = os.environ.get("JOBSTREAM_TEST_JAEGER", "http://127.0.0.1:16686")
OTLP = os.environ.get("JOBSTREAM_TEST_OTLP", "http://127.0.0.1:4318")
RETRY_TOPIC = r"\.retry\.1"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("transport", ["kafka", "nats"])
def test_demo_runs_every_job_to_its_expected_end(transport: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "examples.demo",
            "--transport",
            transport,
            "--jaeger",
            JAEGER,
            "--otlp",
            OTLP,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "9 of 9 jobs ended as expected; processes exited with [0, 0, 0]" in out
    assert '"reason": "retries-exhausted"' in out
    assert "cannot decode https://img.example.com/corrupt.png" in out
    for state in ("succeeded", "dead_lettered", "cancelled"):
        assert state in out
    # The retried job's trace, from Jaeger, as a tree: each line's indent is its depth.
    _, _, tail = out.partition("\ntrace of a retried job ")
    trace_id = tail.split()[0]
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id), tail[:200]
    tree = [line for line in tail.splitlines()[1:] if line.startswith("  ")]
    request = r"POST /v1/jobs/image\.resize  \[demo-ingress\]  [0-9.]+ ms  request"
    publish = r"send jobs\.image\.resize  \[demo-ingress\]  [0-9.]+ ms  publish"
    attempt = r"process jobs\.image\.resize{}  \[demo-worker-[12]\]  [0-9.]+ ms  attempt {}"
    origin = r"\(links: POST /v1/jobs/image\.resize{}\)"
    if transport == "kafka":
        expected = [
            rf"  {request}",
            rf"  └─ {publish}",
            rf"     └─ {attempt.format('', 1)} failed: Retry: image store timed out .*  "
            + origin.format(""),
            r"        └─ send jobs\.image\.resize\.retry\.1  \[demo-worker-[12]\]  [0-9.]+ ms  "
            r"retry hand-off  " + origin.format(""),
            "           └─ "
            + attempt.format(RETRY_TOPIC, 2)
            + " completed  "
            + origin.format(r", process jobs\.image\.resize"),
        ]
    else:  # a NATS retry is a delayed redelivery: both attempts are children of the publish
        expected = [
            rf"  {request}",
            rf"  └─ {publish}",
            rf"     ├─ {attempt.format('', 1)} failed: Retry: image store timed out .*  "
            + origin.format(""),
            rf"     └─ {attempt.format('', 2)} completed  " + origin.format(""),
        ]
    assert len(tree) == len(expected), "\n".join(tree)
    for line, pattern in zip(tree, expected, strict=True):
        assert re.fullmatch(pattern, line), f"{line!r} !~ {pattern!r}"
    assert f"in Jaeger:     {JAEGER}/trace/{trace_id}" in out
    assert re.search(r"in dashboard:  http://127\.0\.0\.1:\d+/ui/jobs/[0-9a-f-]{36}", out)
