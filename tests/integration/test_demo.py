"""`make demo` is the README's first command: its script must pass against the real stack.

The test runs the demo script itself (what `make demo` runs between `make up` and
`make down`), so the shared brokers of the test session stay up.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("transport", ["kafka", "nats"])
def test_demo_runs_every_job_to_its_expected_end(transport: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "examples.demo", "--transport", transport],
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
