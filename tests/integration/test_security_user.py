"""Refusals as a user meets them, on a real secured Redis (TLS, a password), PostgreSQL
(TLS, scram-sha-256, `hostssl` only) and NATS (TLS, users) of `scripts/secure_services.py`,
on private ports (docs/security.md): each store refusal ends `jobstream worker` at once
with one line naming the setting, instead of being waited out for `worker.broker_wait_s`
as a store that does not answer; a password in the URL's query is never printed; a NATS
refusal is the worker's one line too (no asyncio notice about the TLS connection's end).

The stores are opened before the broker, so the worker needs no broker here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, free_port

pytestmark = pytest.mark.integration

REDIS_PORT = int(os.environ.get("JOBSTREAM_TEST_USER_REDIS_PORT", "17080"))
POSTGRES_PORT = int(os.environ.get("JOBSTREAM_TEST_USER_POSTGRES_PORT", "16080"))
NATS_PORT = int(os.environ.get("JOBSTREAM_TEST_USER_NATS_PORT", "15022"))
NATS_MONITOR_PORT = int(os.environ.get("JOBSTREAM_TEST_USER_NATS_MONITOR_PORT", "19022"))
BROKER_WAIT_S = 60  # what a refusal must not wait out


def _script(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "JOBSTREAM_LOCAL_RUN_DIR": str(run_dir),
        "JOBSTREAM_SECURE_REDIS_PORT": str(REDIS_PORT),
        "JOBSTREAM_SECURE_POSTGRES_PORT": str(POSTGRES_PORT),
        "JOBSTREAM_SECURE_NATS_PORT": str(NATS_PORT),
        "JOBSTREAM_SECURE_NATS_MONITOR_PORT": str(NATS_MONITOR_PORT),
    }
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/secure_services.py"),
            *args,
            "redis",
            "postgres",
            "nats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    # In the repository's .run: PostgreSQL runs as `postgres`, which must reach its folder.
    run_dir = ROOT / ".run" / f"secure-user-test-{os.getpid()}"
    started = _script(run_dir, "up")
    try:
        assert started.returncode == 0, started.stderr
        yield run_dir / "secure"
    finally:
        _script(run_dir, "down")
        shutil.rmtree(run_dir, ignore_errors=True)


def _worker(**settings: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSTREAM_")}
    env.update(
        PYTHONPATH=str(ROOT),
        JOBSTREAM_HEALTH__PORT="0",
        JOBSTREAM_WORKER__BROKER_WAIT_S=str(BROKER_WAIT_S),
        **settings,
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "jobstream", "worker", "examples.app:app"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BROKER_WAIT_S + 30,
        check=False,
    )
    return result, time.monotonic() - started


def _postgres(home: Path, host: str = "127.0.0.1", ca: str = "ca.pem", query: str = "") -> str:
    return (
        f"postgresql://jobstream@{host}:{POSTGRES_PORT}/postgres"
        f"?sslmode=verify-full&sslrootcert={home / ca}{query}"
    )


@pytest.mark.parametrize(
    "case",
    ["postgres-host-mismatch", "postgres-no-password", "postgres-no-tls", "redis-no-password"],
)
def test_a_store_refusal_ends_the_worker_at_once_naming_the_setting(home: Path, case: str) -> None:
    """Before: each of these was retried as an outage for `worker.broker_wait_s`."""
    password = {"JOBSTREAM_IDEMPOTENCY__PASSWORD_FILE": str(home / "postgres-password")}
    settings = {
        "postgres-host-mismatch": {"JOBSTREAM_IDEMPOTENCY__URL": _postgres(home, "localhost")},
        "postgres-no-password": {"JOBSTREAM_IDEMPOTENCY__URL": _postgres(home)},
        "postgres-no-tls": {
            "JOBSTREAM_IDEMPOTENCY__URL": f"postgresql://jobstream@127.0.0.1:{POSTGRES_PORT}"
            "/postgres?sslmode=disable"
        },
        "redis-no-password": {
            "JOBSTREAM_STATUS__BACKEND": "redis",
            "JOBSTREAM_STATUS__URL": f"rediss://127.0.0.1:{REDIS_PORT}/0"
            f"?ssl_ca_certs={home / 'ca.pem'}",
        },
    }[case]
    if case.startswith("postgres"):
        settings = {"JOBSTREAM_IDEMPOTENCY__BACKEND": "postgres", **settings}
        if case != "postgres-no-password":
            settings.update(password)
    result, took = _worker(**settings)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr[-3000:]
    assert len(lines) == 1, lines[-5:]
    store = "status" if case.startswith("redis") else "idempotency"
    assert "refused the connection" in lines[0]
    assert f"check {store}.url (its user, CA and host) and {store}.password_file" in lines[0]
    assert took < 15, took  # not BROKER_WAIT_S


def test_a_password_in_a_postgres_urls_query_is_never_printed(home: Path) -> None:
    secret = (home / "postgres-password").read_text().strip()
    url = _postgres(home, ca="other-ca.pem", query=f"&password={secret}")
    result, _ = _worker(JOBSTREAM_IDEMPOTENCY__BACKEND="postgres", JOBSTREAM_IDEMPOTENCY__URL=url)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "password=***" in result.stderr and "certificate verify failed" in result.stderr
    assert secret not in result.stdout + result.stderr


def test_a_nats_refusal_is_the_workers_only_line(home: Path) -> None:
    wrong = home.parent / "wrong-password"
    wrong.write_text("not-the-password\n")
    result, took = _worker(
        JOBSTREAM_TRANSPORT="nats",
        JOBSTREAM_NATS__SERVERS=f'["tls://127.0.0.1:{NATS_PORT}"]',
        JOBSTREAM_NATS__TLS_CA_FILE=str(home / "ca.pem"),
        JOBSTREAM_NATS__USER="jobstream",
        JOBSTREAM_NATS__PASSWORD_FILE=str(wrong),
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"error: nats at tls://127.0.0.1:{NATS_PORT} refused the connection: the credentials "
        "were refused (Authorization Violation); check nats.user and nats.password (or "
        "nats.password_file)"
    ]
    assert took < 15, took


@pytest.mark.parametrize("command", ["ingress", "ui"])
def test_a_status_store_refusal_names_its_password_setting(
    home: Path, tmp_path: Path, command: str
) -> None:
    """`ingress` and `ui` start with a wrong status-store password: one line naming
    `status.password_file`, without the password (before: "did not answer")."""
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-redis-password\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSTREAM_")}
    env.update(
        PYTHONPATH=str(ROOT),
        JOBSTREAM_STATUS__BACKEND="redis",
        JOBSTREAM_STATUS__URL=f"rediss://127.0.0.1:{REDIS_PORT}/0?ssl_ca_certs={home / 'ca.pem'}",
        JOBSTREAM_STATUS__PASSWORD_FILE=str(wrong),
        JOBSTREAM_INGRESS__PORT=str(free_port()),
    )
    result = subprocess.run(
        [sys.executable, "-m", "jobstream", command],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr[-2000:]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: the status store refused the connection"), lines[0]
    assert lines[0].endswith("check status.url (its user, CA and host) and status.password_file")
    assert "not-the-redis-password" not in result.stderr + result.stdout
