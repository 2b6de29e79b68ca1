"""`jobstream topics ensure` and `jobstream schemas export`, run as the console script."""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path

import pytest

from tests.conftest import NATS_URL
from tests.integration.test_cli_publish import cli, one_error_line

pytestmark = pytest.mark.integration

EXAMPLE_TYPES = ["email.welcome", "image.resize", "report.generate"]
REPO = Path(__file__).resolve().parents[2]


async def test_topics_ensure_creates_kafka_topics_once(kafka_admin) -> None:
    prefix = f"ensure-{uuid.uuid4().hex[:8]}."
    env = {
        "JOBSTREAM_ROUTING__TOPIC_PREFIX": prefix,
        "JOBSTREAM_ROUTING__PARTITIONS": "2",
        "JOBSTREAM_RETRY__TIERS_S": "[5, 60]",
    }
    mains = [prefix + t for t in EXAMPLE_TYPES]
    # Each main topic comes with its retry tiers and its dead-letter topic.
    topics = [f"{t}{suffix}" for t in mains for suffix in ("", ".retry.1", ".retry.2", ".dlq")]
    try:
        first = cli("topics", "ensure", **env)
        assert first.returncode == 0, first.stderr
        assert first.stdout.splitlines() == [f"kafka topic {t}: created" for t in topics]
        described = await kafka_admin.describe_topics(topics)
        assert [len(t["partitions"]) for t in described] == [2] * len(topics)
        again = cli("topics", "ensure", **env)
        assert again.stdout.splitlines() == [f"kafka topic {t}: exists" for t in topics]
    finally:
        await kafka_admin.delete_topics([t for t in topics if t in await kafka_admin.list_topics()])


async def test_topics_ensure_creates_the_nats_stream(jetstream) -> None:
    stream = f"ENSURE_{uuid.uuid4().hex[:8]}"
    env = {
        "JOBSTREAM_NATS__SERVERS": json.dumps([NATS_URL]),
        "JOBSTREAM_ROUTING__STREAM": stream,
        "JOBSTREAM_ROUTING__SUBJECT_PREFIX": f"{stream.lower()}.",
        "JOBSTREAM_JETSTREAM__REPLAY_LEDGER_BUCKET": f"{stream}_REPLAYS",
    }
    try:
        result = cli("topics", "ensure", "--transport", "nats", **env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"nats stream {stream}: created;")
        info = await jetstream.stream_info(stream)
        assert info.config.subjects == [f"{stream.lower()}.>"]
        again = cli("topics", "ensure", "--transport", "nats", **env)
        assert f"nats stream {stream}: exists" in again.stdout
    finally:
        # `topics ensure` also made the dead-letter stream and the replay ledger bucket.
        for name in (stream, f"{stream}_DLQ", f"KV_{stream}_REPLAYS"):
            with contextlib.suppress(Exception):
                await jetstream.delete_stream(name)


def test_schemas_export_then_check(tmp_path: Path) -> None:
    out = tmp_path / "jsonschema"
    assert cli("schemas", "export", "--check", "--out", str(out)).returncode == 1
    written = cli("schemas", "export", "--out", str(out))
    assert written.returncode == 0, written.stderr
    assert cli("schemas", "export", "--check", "--out", str(out)).returncode == 0

    (out / "email.welcome" / "v1.schema.json").write_text("{}\n")
    (out / "stale.json").write_text("{}\n")
    result = cli("schemas", "export", "--check", "--out", str(out))
    assert result.returncode == 1
    line = one_error_line(result)
    assert "email.welcome/v1.schema.json" in line
    assert "stale.json" in line
    assert "index.json" not in line

    assert cli("schemas", "export", "--out", str(out)).returncode == 0
    assert not (out / "stale.json").exists()
    assert cli("schemas", "export", "--check", "--out", str(out)).returncode == 0


def test_checked_in_schemas_are_current() -> None:
    result = cli("schemas", "export", "--check", "--out", str(REPO / "schemas" / "jsonschema"))
    assert result.returncode == 0, result.stderr
