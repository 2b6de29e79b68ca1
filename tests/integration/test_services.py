"""`make up` is idempotent and `make down` leaves no process behind.

Runs the service script on its own ports and run folder, so the brokers the other tests use
are not disturbed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _services(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "JOBSTREAM_LOCAL_RUN_DIR": str(run_dir),
        "JOBSTREAM_LOCAL_KAFKA_PORT": "19092",
        "JOBSTREAM_LOCAL_NATS_PORT": "14222",
    }
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/services.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _processes_using(run_dir: Path) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(run_dir) in cmdline and "services.py" not in cmdline:
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


@pytest.mark.timeout(300)
def test_up_twice_starts_nothing_new_and_down_leaves_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    try:
        first = _services(run_dir, "up", "kafka", "nats")
        assert first.returncode == 0, first.stderr
        pids = {name: (run_dir / name / "pid").read_text() for name in ("kafka", "nats")}
        assert "ready at 127.0.0.1:19092" in first.stdout
        assert "ready at nats://127.0.0.1:14222" in first.stdout

        second = _services(run_dir, "up", "kafka", "nats")
        assert second.returncode == 0, second.stderr
        assert second.stdout.count("already running") == 2
        assert pids == {name: (run_dir / name / "pid").read_text() for name in ("kafka", "nats")}
        assert len(_processes_using(run_dir)) == 2
    finally:
        down = _services(run_dir, "down")
    assert down.returncode == 0, down.stderr
    assert _processes_using(run_dir) == []
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
