"""`--priority`, `--unique-key`/`--unique-for` (and an `--envelope` line's fields) and the
ingress's `?priority=`, `?unique_key=`, `?unique_for=` (issue 15), on the memory broker: the
record lands in its level's topic, and every bad value or missing setting is one stderr
line with exit 2 (CLI) or a 400 (ingress) that publishes nothing."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator

import httpx
import pytest
from click.testing import Result
from typer.testing import CliRunner

from consumer.core import Settings
from consumer.stores import MemoryStatusStore
from jobstream._cli import app
from jobstream._ingress import create_app
from jobstream._job_options import JobOptions, parse_job_options
from producer.memory import BROKER
from schemas import Job, JobRegistry

PAYLOAD = '{"account_id": "acct-1", "month": "2025-01"}'
LEVELS = {"high": ".priority-high", "normal": "", "low": ".priority-low"}


class Ping(Job, type="test.options.ping", version=1, register=False):
    n: int


@pytest.fixture
def topic(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh memory topic, at every level, that `report.generate` is routed to."""
    name = f"cli-options-{uuid.uuid4().hex[:8]}"
    for suffix in LEVELS.values():
        BROKER.create_topic(name + suffix)
    for variable in [v for v in os.environ if v.startswith("JOBSTREAM_")]:
        monkeypatch.delenv(variable)
    monkeypatch.setenv("JOBSTREAM_TRANSPORT", "memory")
    monkeypatch.setenv("JOBSTREAM_ROUTING__ROUTES", json.dumps({"report.generate": name}))
    monkeypatch.setenv("JOBSTREAM_ROUTING__PRIORITIES", "true")
    yield name
    BROKER.faults.reset()


def jobstream(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(app, list(args), input=stdin)


def ids(topic: str) -> list[str]:
    found = []
    for partition in range(BROKER.partitions(topic)):
        for record in BROKER.read(topic, partition, 0, 1000):
            found.append(dict(record.headers)["ce_id"].decode())
    return sorted(found)


def receipts(result: Result) -> list[str]:
    assert result.exit_code == 0, result.stderr
    return [json.loads(line)["job_id"] for line in result.stdout.splitlines()]


def one_error_line(result: Result) -> str:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ")
    return line


# -- parsing, one place for both --------------------------------------------------------


def test_the_defaults_add_nothing_to_the_fingerprint_or_the_publish() -> None:
    options = parse_job_options({}.get)
    assert options == JobOptions()
    assert (options.canonical, options.publish_options()) == (None, {})


def test_each_option_is_part_of_the_fingerprint() -> None:
    prints = {
        parse_job_options(given.get).canonical
        for given in (
            {},
            {"priority": "high"},
            {"priority": "low"},
            {"unique_key": "a", "unique_for": "60"},
            {"unique_key": "a", "unique_for": "61"},
            {"unique_key": "b", "unique_for": "60"},
            {"delay": "5"},
            {"delay": "5", "priority": "high"},
        )
    }
    assert len(prints) == 8


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"priority": "urgent"}, "priority must be one of high, normal, low, got 'urgent'"),
        ({"unique_key": "a"}, "unique_key needs unique_for"),
        ({"unique_for": "60"}, "unique_for needs unique_key"),
        ({"unique_key": "", "unique_for": "60"}, "unique_key must be a non-empty string"),
        ({"unique_key": 7, "unique_for": "60"}, "unique_key must be a non-empty string, got 7"),
        ({"unique_key": "a", "unique_for": "0"}, "unique_for must be a finite number"),
        ({"unique_key": "a", "unique_for": "nan"}, "unique_for must be a finite number"),
        ({"unique_key": "a", "unique_for": "soon"}, "unique_for must be a number of seconds"),
        ({"unique_key": "a", "unique_for": True}, "unique_for must be a number of seconds"),
    ],
)
def test_a_bad_option_is_a_value_error_naming_it(given: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        parse_job_options(given.get)


# -- the CLI ----------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["high", "normal", "low"])
def test_priority_publishes_to_the_levels_topic(topic: str, level: str) -> None:
    [job_id] = receipts(
        jobstream("publish", "report.generate", "--data", PAYLOAD, "--priority", level)
    )
    assert {lvl: ids(topic + suffix) for lvl, suffix in LEVELS.items()} == {
        lvl: [job_id] if lvl == level else [] for lvl in LEVELS
    }


def test_an_envelope_lines_priority_replaces_the_flags(topic: str) -> None:
    lines = [
        json.dumps({"data": json.loads(PAYLOAD), "id": "a"}),
        json.dumps({"data": json.loads(PAYLOAD), "id": "b", "priority": "low"}),
        json.dumps({"data": json.loads(PAYLOAD), "id": "c", "priority": "normal"}),
    ]
    result = jobstream(
        "publish", "report.generate", "--envelope", "--priority", "high", stdin="\n".join(lines)
    )
    assert receipts(result) == ["a", "b", "c"]
    assert [ids(topic + suffix) for suffix in LEVELS.values()] == [["a"], ["c"], ["b"]]


def test_priority_without_the_setting_is_one_line_naming_it(
    topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBSTREAM_ROUTING__PRIORITIES", "false")
    line = one_error_line(
        jobstream("publish", "report.generate", "--data", PAYLOAD, "--priority", "high")
    )
    assert "JOBSTREAM_ROUTING__PRIORITIES=true" in line
    assert [ids(topic + suffix) for suffix in LEVELS.values()] == [[], [], []]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--unique-key", "k"], "--unique-key needs --unique-for"),
        (["--unique-for", "30"], "--unique-for needs --unique-key"),
        (["--unique-key", "k", "--unique-for", "-1"], "--unique-for must be a finite number"),
    ],
)
def test_a_bad_unique_flag_is_one_line_and_publishes_nothing(
    topic: str, args: list[str], message: str
) -> None:
    line = one_error_line(jobstream("publish", "report.generate", "--data", PAYLOAD, *args))
    assert line.startswith(f"error: {message}")
    assert ids(topic) == []


def test_a_bad_envelope_option_names_its_line_and_publishes_nothing(topic: str) -> None:
    lines = [
        json.dumps({"data": json.loads(PAYLOAD)}),
        json.dumps({"data": json.loads(PAYLOAD), "priority": "asap"}),
    ]
    line = one_error_line(
        jobstream("publish", "report.generate", "--envelope", stdin="\n".join(lines))
    )
    assert line.startswith('error: stdin line 2: "priority" must be one of high, normal, low')
    assert [ids(topic + suffix) for suffix in LEVELS.values()] == [[], [], []]


# -- the ingress ------------------------------------------------------------------------


def ingress(topic: str, **routing: object) -> httpx.AsyncClient:
    settings = Settings(
        transport="memory",
        routing={"routes": {"test.options.ping": topic}, **routing},
        status={"backend": "memory"},
    )
    web = create_app(settings, MemoryStatusStore(), registry=JobRegistry([Ping]))
    transport = httpx.ASGITransport(app=web, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://ingress")


PATH = "/v1/jobs/test.options.ping"


async def test_priority_query_publishes_to_the_levels_topic(topic: str) -> None:
    async with ingress(topic, priorities=True) as http:
        answers = {
            level: await http.post(PATH, json={"n": 1}, params={"priority": level})
            for level in LEVELS
        }
    assert {level: a.status_code for level, a in answers.items()} == dict.fromkeys(LEVELS, 202)
    assert {level: ids(topic + suffix) for level, suffix in LEVELS.items()} == {
        level: [answer.json()["job_id"]] for level, answer in answers.items()
    }


@pytest.mark.parametrize(
    ("params", "headers", "message"),
    [
        ({"priority": "urgent"}, {}, "priority must be one of high, normal, low"),
        ({"unique_key": "k"}, {}, "unique_key needs unique_for"),
        ({"unique_key": "k", "unique_for": "inf"}, {}, "unique_for must be a finite number"),
        (
            {"unique_key": "k", "unique_for": "60"},
            {"Idempotency-Key": "i-1"},
            "send an Idempotency-Key or ?unique_key=, not both",
        ),
    ],
)
async def test_a_bad_option_is_a_400_that_publishes_nothing(
    topic: str, params: dict[str, str], headers: dict[str, str], message: str
) -> None:
    async with ingress(topic, priorities=True) as http:
        answer = await http.post(PATH, json={"n": 1}, params=params, headers=headers)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"].startswith(message)
    assert [ids(topic + suffix) for suffix in LEVELS.values()] == [[], [], []]


async def test_priority_without_the_setting_is_a_400_naming_it(topic: str) -> None:
    async with ingress(topic, priorities=False) as http:
        answer = await http.post(PATH, json={"n": 1}, params={"priority": "low"})
    assert answer.status_code == 400, answer.text
    assert "routing.priorities" in answer.json()["error"]
    assert [ids(topic + suffix) for suffix in LEVELS.values()] == [[], [], []]


# -- found by trying it (issue 15 review) ------------------------------------------------


def test_a_bad_priority_flag_is_one_line_like_the_others(topic: str) -> None:
    line = one_error_line(
        jobstream("publish", "report.generate", "--data", PAYLOAD, "--priority", "urgent")
    )
    assert line == "error: --priority must be one of high, normal, low, got 'urgent'"


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ({"priority": "high"}, "needs routing.priorities on"),
        ({"unique_key": "k", "unique_for": 1e7}, "unique_for must be a finite number of"),
        ({"unique_key": "k" * 513, "unique_for": 10}, "unique_key must be 1 to 512 bytes"),
        ({"unique_key": "a\u0000b", "unique_for": 10}, "unique_key must not contain NUL"),
        ({"unique_key": "k", "unique_for": "5"}, '"unique_for" must be a JSON number'),
    ],
)
def test_a_line_the_producer_would_refuse_is_refused_before_any_is_sent(
    topic: str, monkeypatch: pytest.MonkeyPatch, bad_line: dict[str, object], message: str
) -> None:
    """1,200 good lines, then one the producer refuses: before, the first 1,000 (one batch)
    were published before the refusal; now nothing is, and the line is named."""
    monkeypatch.setenv("JOBSTREAM_ROUTING__PRIORITIES", "false")
    monkeypatch.setenv("JOBSTREAM_UNIQUE__URL", "memory")
    good = json.dumps({"data": json.loads(PAYLOAD)})
    bad = json.dumps({"data": json.loads(PAYLOAD), **bad_line})
    result = jobstream(
        "publish", "report.generate", "--envelope", stdin="\n".join([good] * 1200 + [bad])
    )
    line = one_error_line(result)
    assert line.startswith("error: stdin line 1201: "), line
    assert message in line
    assert ids(topic) == []


def test_a_unique_store_that_is_down_is_one_line_without_id_advice(
    topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBSTREAM_UNIQUE__URL", "redis://127.0.0.1:1/0")  # nothing listens
    monkeypatch.setenv("JOBSTREAM_UNIQUE__TIMEOUT_S", "1")
    result = jobstream(
        "publish", "report.generate", "--data", PAYLOAD, "--unique-key", "k", "--unique-for", "9"
    )
    assert result.exit_code == 1, (result.stdout, result.stderr)
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and "127.0.0.1:1" in line, line
    assert "--id" not in line  # nothing was published: there is no job id to publish again
    assert ids(topic) == []
