"""Bad settings and unreachable stores stop `jobstream worker` / `publish` with one line.

Each case runs the installed console script: a settings error exits 2 with exactly one
stderr line naming what to fix; a store that does not answer exits 1 after
`worker.broker_wait_s`, its last stderr line naming the URL (without its password) and the
setting, the lines before it the worker's JSON warnings (no traceback).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import KAFKA_BOOTSTRAP

JOBSTREAM = str(Path(sys.executable).parent / "jobstream")
APP = "tests.apps.recorder:app"
ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JOBSTREAM_")}
    clean.update(
        {
            "JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS": KAFKA_BOOTSTRAP,
            "JOBSTREAM_WORKER__BROKER_WAIT_S": "2",
            "JOBSTREAM_HEALTH__PORT": "0",
            "JOBSTREAM_TEST_SINK": os.devnull,
            "PYTHONPATH": str(ROOT),
            **env,
        }
    )
    return subprocess.run(
        [JOBSTREAM, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=clean,
        timeout=60,
        check=False,
    )


def one_error_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    lines = result.stderr.splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    "command", [["worker", APP], ["publish", "test.record", "--data", '{"seq": 1, "key": "k"}']]
)
def test_malformed_config_file_is_one_line_with_its_place(
    tmp_path: Path, command: list[str]
) -> None:
    config = tmp_path / "jobstream.toml"
    config.write_text('[worker]\ngroup = "a"\nmax_in_flight = \n', encoding="utf-8")
    line = one_error_line(cli(*command, JOBSTREAM_CONFIG_FILE=str(config)), 2)
    assert f"JOBSTREAM_CONFIG_FILE={config}" in line
    assert "line 3, column 17" in line


@pytest.mark.parametrize(
    ("backend", "url", "schemes"),
    [
        ("redis", "http://x", "redis://, rediss:// or unix://"),
        ("postgres", "http://x", "postgresql:// or postgres://"),
        ("nats-kv", "redis://x", "nats://"),
    ],
)
def test_idempotency_url_of_another_scheme_is_a_setting_error(
    backend: str, url: str, schemes: str
) -> None:
    result = cli(
        "worker", APP, JOBSTREAM_IDEMPOTENCY__BACKEND=backend, JOBSTREAM_IDEMPOTENCY__URL=url
    )
    line = one_error_line(result, 2)
    assert "JOBSTREAM_IDEMPOTENCY__URL" in line
    assert schemes in line


def test_status_url_of_another_scheme_is_a_setting_error() -> None:
    result = cli("worker", APP, JOBSTREAM_STATUS__BACKEND="redis", JOBSTREAM_STATUS__URL="http://x")
    line = one_error_line(result, 2)
    assert "JOBSTREAM_STATUS__URL" in line
    assert "redis://" in line


@pytest.mark.parametrize(
    ("backend", "url"),
    [
        ("postgres", "postgresql://jobstream@127.0.0.1:1/postgres"),
        ("nats-kv", "nats://127.0.0.1:1"),
    ],
)
def test_namespace_that_cannot_name_a_table_or_bucket_is_a_setting_error(
    backend: str, url: str
) -> None:
    result = cli(
        "worker",
        APP,
        JOBSTREAM_IDEMPOTENCY__BACKEND=backend,
        JOBSTREAM_IDEMPOTENCY__URL=url,
        JOBSTREAM_IDEMPOTENCY__NAMESPACE="bad-name;",
    )
    assert "JOBSTREAM_IDEMPOTENCY__NAMESPACE" in one_error_line(result, 2)


@pytest.mark.parametrize(
    ("backend", "url"),
    [
        ("redis", "redis://:s3cret@127.0.0.1:{port}/0"),
        ("postgres", "postgresql://jobstream:s3cret@127.0.0.1:{port}/postgres"),
    ],
)
def test_unreachable_idempotency_store_is_waited_for_then_one_line(backend: str, url: str) -> None:
    url = url.format(port=closed_port())
    result = cli(
        "worker", APP, JOBSTREAM_IDEMPOTENCY__BACKEND=backend, JOBSTREAM_IDEMPOTENCY__URL=url
    )
    assert result.returncode == 1, result.stderr
    *logged, last = result.stderr.splitlines()
    assert last.startswith(f"error: the idempotency store at {url.replace('s3cret', '***')} ")
    assert "did not answer within 2s" in last
    assert "JOBSTREAM_IDEMPOTENCY__URL" in last
    assert "s3cret" not in result.stderr
    assert logged, "the retries are logged"
    assert all(json.loads(line)["level"] == "warning" for line in logged), result.stderr


@pytest.mark.integration
def test_health_port_in_use_names_the_setting_and_the_fix() -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}."
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli(
            "worker",
            APP,
            "--health-port",
            str(port),
            JOBSTREAM_CREATE_MISSING="true",
            JOBSTREAM_ROUTING__PARTITIONS="1",
            JOBSTREAM_ROUTING__TOPIC_PREFIX=prefix,
            JOBSTREAM_WORKER__GROUP=f"g{prefix}",
        )
    line = one_error_line(result, 1)
    assert f"127.0.0.1:{port}" in line
    assert "JOBSTREAM_HEALTH__PORT / --health-port" in line


@pytest.mark.parametrize(
    "command", [["worker", APP], ["publish", "test.record", "--data", '{"seq": 1, "key": "k"}']]
)
def test_settings_a_client_refuses_are_one_line(command: list[str]) -> None:
    result = cli(
        *command,
        JOBSTREAM_KAFKA__SECURITY_PROTOCOL="SASL_PLAINTEXT",
        JOBSTREAM_KAFKA__SASL_MECHANISM="PLAIN",
        JOBSTREAM_JOB_MODULES='["tests.apps.recorder"]',
    )
    line = one_error_line(result, 2)
    assert "sasl" in line
    assert "JOBSTREAM_" in line
