"""`jobstream publish`, run as the installed console script against the real brokers."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.conftest import KAFKA_BOOTSTRAP, NATS_URL

pytestmark = pytest.mark.integration

JOBSTREAM = str(Path(sys.executable).parent / "jobstream")
WELCOME = {"user_id": "42", "email": "ada@example.com", "name": "Ada"}


def cli(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JOBSTREAM_")}
    clean.update({"JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS": KAFKA_BOOTSTRAP, **env})
    return subprocess.run(
        [JOBSTREAM, *args],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=clean,
        timeout=60,
        check=False,
    )


def routed_to(topic: str) -> dict[str, str]:
    return {"JOBSTREAM_ROUTING__ROUTES": json.dumps({"email.welcome": topic})}


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


async def count(topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA_BOOTSTRAP)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, 0)])
        return int(sum(ends.values()))
    finally:
        await consumer.stop()


async def test_publish_prints_one_json_receipt(new_topic) -> None:
    topic = await new_topic()
    args = ["publish", "email.welcome", "--version", "1", "--key", "user-42", "--id", "job-1"]
    result = cli(*args, "--data", json.dumps(WELCOME), **routed_to(topic))
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    assert json.loads(line) == {
        "job_id": "job-1",
        "transport": "kafka",
        "destination": topic,
        "partition": 0,
        "offset": 0,
        "duplicate": False,
        "spooled": False,
    }
    assert await count(topic) == 1


async def test_data_from_a_file(new_topic, tmp_path: Path) -> None:
    topic = await new_topic()
    payload = tmp_path / "job.json"
    payload.write_text(json.dumps({**WELCOME, "marketing_opt_in": True}))
    result = cli("publish", "email.welcome", "--data", f"@{payload}", **routed_to(topic))
    assert result.returncode == 0, result.stderr
    assert await count(topic) == 1


async def test_invalid_payload_exits_2_with_one_line_and_sends_nothing(new_topic) -> None:
    topic = await new_topic()
    bad = json.dumps({**WELCOME, "email": "not-an-address"})
    result = cli("publish", "email.welcome", "--version", "1", "--data", bad, **routed_to(topic))
    assert result.returncode == 2
    line = one_error_line(result)
    assert "field 'email'" in line
    assert "not a valid email address" in line
    assert result.stdout == ""
    assert await count(topic) == 0


async def test_stdin_lines_are_published_in_bulk(new_topic) -> None:
    topic = await new_topic()
    lines = [json.dumps({**WELCOME, "user_id": str(i)}) for i in range(3)]
    stdin = "\n".join([lines[0], "", *lines[1:]]) + "\n"
    result = cli("publish", "email.welcome", "--version", "1", stdin=stdin, **routed_to(topic))
    assert result.returncode == 0, result.stderr
    receipts = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["offset"] for r in receipts] == [0, 1, 2]
    assert len({r["job_id"] for r in receipts}) == 3
    assert await count(topic) == 3


async def test_stdin_envelopes_carry_key_and_id(new_topic) -> None:
    topic = await new_topic()
    lines = [json.dumps({"data": WELCOME, "key": f"k{i}", "id": f"id-{i}"}) for i in range(2)]
    args = ["publish", "email.welcome", "--version", "1", "--envelope"]
    result = cli(*args, stdin="\n".join(lines), **routed_to(topic))
    assert result.returncode == 0, result.stderr
    assert [json.loads(x)["job_id"] for x in result.stdout.splitlines()] == ["id-0", "id-1"]


async def test_one_bad_stdin_line_sends_nothing(new_topic) -> None:
    topic = await new_topic()
    stdin = json.dumps(WELCOME) + "\n" + json.dumps({"user_id": "1"}) + "\n"
    result = cli("publish", "email.welcome", "--version", "1", stdin=stdin, **routed_to(topic))
    assert result.returncode == 2
    assert "stdin line 2" in one_error_line(result)
    assert await count(topic) == 0


def test_no_payload_is_a_usage_error() -> None:
    result = cli("publish", "email.welcome", stdin="")
    assert result.returncode == 2
    assert "stdin held no jobs" in one_error_line(result)


def test_unknown_job_type_is_a_usage_error() -> None:
    result = cli("publish", "no.such.type", "--data", "{}")
    assert result.returncode == 2
    assert "unknown job type 'no.such.type'" in one_error_line(result)


def test_unreachable_broker_exits_1_with_one_line() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["publish", "email.welcome", "--version", "1", "--data", json.dumps(WELCOME)]
    result = cli(
        *args,
        JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{port}",
        JOBSTREAM_KAFKA__CONNECT_TIMEOUT_S="1",
    )
    assert result.returncode == 1
    line = one_error_line(result)
    assert f"127.0.0.1:{port}" in line
    assert "make up" in line
    # The job id is chosen before the publish, so the error names it for a safe repeat.
    assert re.search(r"job id ([0-9a-f-]{36}): publish again with --id \1", line), line


def test_missing_topic_says_to_run_topics_ensure() -> None:
    args = ["publish", "email.welcome", "--version", "1", "--data", json.dumps(WELCOME)]
    result = cli(*args, **routed_to("no-such-topic-for-cli-test"))
    assert result.returncode == 1
    assert "jobstream topics ensure" in one_error_line(result)


def test_bad_setting_names_the_environment_variable() -> None:
    result = cli("publish", "email.welcome", "--data", "{}", JOBSTREAM_KAFKA__LINGER_MS="soon")
    assert result.returncode == 2
    assert "JOBSTREAM_KAFKA__LINGER_MS" in one_error_line(result)


async def test_publish_to_nats(new_stream) -> None:
    stream, prefix = await new_stream()
    data = json.dumps({"account_id": "a", "month": "2025-01"})
    args = ["publish", "report.generate", "--transport", "nats", "--data", data, "--id", "r-1"]
    result = cli(
        *args,
        JOBSTREAM_NATS__SERVERS=json.dumps([NATS_URL]),
        JOBSTREAM_ROUTING__SUBJECT_PREFIX=f"{prefix}.",
    )
    assert result.returncode == 0, result.stderr
    receipt = json.loads(result.stdout)
    assert (receipt["destination"], receipt["offset"], receipt["partition"]) == (stream, 1, None)
