"""The job log line and the log handler: the fields and values of a line, nothing built
when the level is off (and a level changed at run time obeyed), the same JSON as
`json.dumps` wrote, the buffer's order and flush points, and, in child processes, that
every line reaches stderr at a normal exit, at SIGTERM, at a forced exit and from a
forked child, counted by job id; the broker clients' lines in the same format."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from consumer.core import Delivery, JobRun, LoggingSettings, Outcome
from consumer.steps import logging_step
from consumer.telemetry import JsonFormatter, LineHandler, configure_logging
from schemas import JobAttributes, encode
from schemas.examples import GenerateReport

ROOT = Path(__file__).resolve().parents[2]
JOBSTREAM = str(Path(sys.executable).parent / "jobstream")
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    """The `jobstream` loggers into a buffered `LineHandler` over a string, as the CLI
    sets them up (JSON, INFO); restored afterwards."""
    stream = io.StringIO()
    root = logging.getLogger("jobstream")
    saved = (root.handlers[:], root.level, root.propagate)
    handler = LineHandler(stream)
    handler.setFormatter(JsonFormatter())
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
    yield stream
    handler.close()
    root.handlers[:], root.level, root.propagate = saved
    logging.getLogger("jobstream.job").setLevel(logging.NOTSET)


def written(stream: io.StringIO) -> list[dict[str, object]]:
    for handler in logging.getLogger("jobstream").handlers:
        handler.flush()
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def attributes() -> JobAttributes:
    message = encode(GenerateReport(account_id="a", month="2025-01"), source="/t")
    return message.attributes.replace(attempt=2)


def run_of(error: Exception | None = None, *, parsed: bool = True) -> JobRun:
    delivery = Delivery(
        partition=3,
        offset=7,
        topic="jobs.report",
        attributes=attributes() if parsed else None,
        body=b"{}",
    )
    return JobRun(delivery, None, None, None, error=error)


async def step(run: JobRun, outcome: Outcome = Outcome.COMPLETED) -> Outcome:
    async def call_next(run: JobRun) -> Outcome:
        return outcome

    return await logging_step(run, call_next)


async def test_a_completed_job_is_one_info_line_with_the_documented_fields(
    lines: io.StringIO,
) -> None:
    run = run_of()
    await step(run)
    [line] = written(lines)
    assert list(line) == [
        *("time", "level", "logger", "message", "outcome", "duration_ms", "topic", "offset"),
        *("job_id", "job_type", "attempt"),
    ]
    assert TIME.match(str(line["time"])), line
    stamp = datetime.fromisoformat(str(line["time"]))
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60
    assert run.attributes is not None
    assert line == {
        "time": line["time"],
        "level": "info",
        "logger": "jobstream.job",
        "message": "job completed",
        "outcome": "completed",
        "duration_ms": line["duration_ms"],
        "topic": "jobs.report",
        "offset": 7,
        "job_id": run.attributes.id,
        "job_type": "report.generate",
        "attempt": 2,
    }
    assert isinstance(line["duration_ms"], float)
    assert line["duration_ms"] >= 0


async def test_a_failure_is_a_warning_with_the_error_and_unparsed_attributes_are_absent(
    lines: io.StringIO,
) -> None:
    await step(run_of(ValueError("bad \u00e9 input"), parsed=False), Outcome.RETRYING)
    [line] = written(lines)
    assert line["level"] == "warning"
    assert line["message"] == "job retrying"
    assert line["outcome"] == "retrying"
    assert (line["error_type"], line["error"]) == ("ValueError", "bad \u00e9 input")
    assert "job_id" not in line
    assert "attempt" not in line


async def test_a_cut_off_job_is_an_abandoned_warning(lines: io.StringIO) -> None:
    async def cut_off(run: JobRun) -> Outcome:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await logging_step(run_of(), cut_off)
    [line] = written(lines)
    assert (line["level"], line["outcome"]) == ("warning", "abandoned")


async def test_inside_a_span_the_line_carries_its_ids(lines: io.StringIO) -> None:
    provider = TracerProvider()
    with provider.get_tracer("t").start_as_current_span("process") as span:
        await step(run_of())
        context = span.get_span_context()
    provider.shutdown()
    [line] = written(lines)
    assert line["trace_id"] == f"{context.trace_id:032x}"
    assert line["span_id"] == f"{context.span_id:016x}"


class Untouchable:
    """A delivery that fails the test if anything reads it."""

    def __getattr__(self, name: str) -> object:
        pytest.fail(f"the logging step read delivery.{name} with its level off")


async def test_nothing_is_built_when_the_level_is_off_and_a_level_changed_at_run_time_counts(
    lines: io.StringIO,
) -> None:
    job_logger = logging.getLogger("jobstream.job")
    job_logger.setLevel(logging.WARNING)
    untouched = JobRun(Untouchable(), None, None, None)  # type: ignore[arg-type]
    await step(untouched)
    assert written(lines) == []
    await step(run_of(RuntimeError("x")), Outcome.DEAD_LETTERED)  # a WARNING still goes out
    job_logger.setLevel(logging.INFO)
    await step(run_of())
    logging.getLogger("jobstream").setLevel(logging.ERROR)
    job_logger.setLevel(logging.NOTSET)  # inherits ERROR now
    await step(untouched)
    assert [line["outcome"] for line in written(lines)] == ["dead_lettered", "completed"]


@pytest.mark.parametrize(
    "job",
    [
        {"job_id": "j-1", "attempt": 3, "duration_ms": 1.5, "ok": True, "none": None},
        {"text": 'caf\u00e9 \u2603 "quoted" \\ \n\t\x00', "big": 2**70, "neg": -4},
        {"obj": object(), "nested": {"a": [1, 2.5, "x"]}, "nan": float("nan")},
        {"message": "a job field named like ours", "time": "wins, as dict.update did"},
        {7: "a key that is not a string", "f": 1e300},
    ],
)
def test_the_json_is_what_json_dumps_wrote(job: dict[object, object]) -> None:
    """Same keys, order and values as the formatter before orjson (`json.dumps` of the
    dict); only the spacing and the escaping of non-ASCII characters differ."""
    record = logging.LogRecord("jobstream.handler", logging.INFO, __file__, 1, "m %s", ("x",), None)
    record.job = job
    new = JsonFormatter().format(record)
    stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
    old = json.dumps(
        {"time": stamp, "level": "info", "logger": "jobstream.handler", "message": "m x", **job},
        default=str,
    )
    assert "\n" not in new
    parsed, expected = json.loads(new), json.loads(old)
    if "nan" in job:  # json wrote NaN (not JSON); orjson writes null
        assert parsed.pop("nan") is None
        expected.pop("nan")
    assert list(parsed.items()) == list(expected.items())


def test_an_exception_is_a_field_with_its_traceback() -> None:
    try:
        raise KeyError("gone")
    except KeyError:
        record = logging.LogRecord(
            "jobstream.worker", logging.ERROR, __file__, 1, "failed", None, sys.exc_info()
        )
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "error"
    assert "KeyError: 'gone'" in line["exception"]
    assert "Traceback" in line["exception"]


def test_job_lines_wait_and_any_other_line_writes_them_in_order() -> None:
    stream = io.StringIO()
    handler = LineHandler(stream, flush_interval_s=3600)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    job_logger = logging.getLogger("test.lines")
    job_logger.propagate = False
    job_logger.addHandler(handler)

    def log(name: str, level: int, message: str) -> None:
        handler.handle(logging.LogRecord(name, level, __file__, 1, message, None, None))

    try:
        log("jobstream.job", logging.INFO, "one")
        log("jobstream.handler", logging.INFO, "two")
        assert stream.getvalue() == ""
        log("jobstream.job", logging.WARNING, "three")  # a failure: written at once
        assert stream.getvalue().splitlines() == [
            "jobstream.job one",
            "jobstream.handler two",
            "jobstream.job three",
        ]
        log("jobstream.job", logging.INFO, "four")
        log("jobstream.worker", logging.INFO, "five")  # not a per-job logger: at once
        assert stream.getvalue().splitlines()[-2:] == [
            "jobstream.job four",
            "jobstream.worker five",
        ]
        log("jobstream.job", logging.INFO, "six")
        handler.close()  # what logging.shutdown() does at exit
        assert stream.getvalue().splitlines()[-1] == "jobstream.job six"
    finally:
        job_logger.removeHandler(handler)


def test_a_full_buffer_is_written_without_waiting() -> None:
    stream = io.StringIO()
    handler = LineHandler(stream, flush_interval_s=3600, max_buffered=100)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for index in range(30):
        record = logging.LogRecord("jobstream.job", logging.INFO, __file__, 1, "x" * 9, None, None)
        handler.handle(record)
        if index == 8:
            assert stream.getvalue() == ""
    assert stream.getvalue().count("\n") >= 20
    handler.close()
    assert stream.getvalue().count("\n") == 30


CHILD = """
import logging, os, signal, sys, time
from consumer.core import LoggingSettings
from consumer.telemetry import configure_logging

configure_logging(LoggingSettings(level="INFO", format="json"))
log = logging.getLogger("jobstream.job")
for index in range({n}):
    log.info("job %s", "completed", extra={{"job": {{"job_id": f"job-{{index}}"}}}})
{ending}
"""

ENDINGS = {
    "normal exit": "",
    "SystemExit": "sys.exit(3)",
    "uncaught exception": "raise RuntimeError('boom')",
    # SIGTERM at its default action: the handler configure_logging installs flushes first
    "SIGTERM": "os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)",
    # the worker's drain: SIGTERM handled by the event loop, then a normal exit
    "SIGTERM drained": textwrap.dedent(
        """
        import asyncio
        async def main():
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            os.kill(os.getpid(), signal.SIGTERM)
            await stop.wait()
        asyncio.run(main())
        """
    ),
    # the worker's second signal: an ERROR line, then os._exit
    "forced exit": "logging.getLogger('jobstream.worker').error('second signal'); os._exit(70)",
}
CODES = {
    "normal exit": 0,
    "SystemExit": 3,
    "uncaught exception": 1,
    "SIGTERM": -signal.SIGTERM,
    "SIGTERM drained": 0,
    "forced exit": 70,
}


def run_child(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
        check=False,
    )


def job_ids(stderr: str) -> Counter[str]:
    ids: Counter[str] = Counter()
    for line in stderr.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if "job_id" in entry:
                ids[entry["job_id"]] += 1
    return ids


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_every_line_reaches_stderr_once_however_the_process_ends(ending: str) -> None:
    n = 5000
    result = run_child(CHILD.format(n=n, ending=ENDINGS[ending]))
    assert result.returncode == CODES[ending], result.stderr[-2000:]
    assert job_ids(result.stderr) == {f"job-{index}": 1 for index in range(n)}


def test_a_forked_child_writes_its_own_lines_and_not_the_parents() -> None:
    ending = textwrap.dedent(
        """
        pid = os.fork()
        if pid == 0:
            log.info("job %s", "completed", extra={"job": {"job_id": "child"}})
            os._exit(0)  # as a pool process ends: no atexit, no logging.shutdown
        os.waitpid(pid, 0)
        """
    )
    result = run_child(CHILD.format(n=100, ending=ending))
    assert result.returncode == 0, result.stderr[-2000:]
    expected = {f"job-{index}": 1 for index in range(100)} | {"child": 1}
    assert job_ids(result.stderr) == expected


WORKER = """
import asyncio, os, signal
from consumer import App, JobContext, Settings, run_worker
from consumer.core import LoggingSettings
from consumer.telemetry import configure_logging
from producer import JobProducer, ProducerSettings
from schemas.examples import GenerateReport

configure_logging(LoggingSettings(level="INFO", format="json"))
app = App("logs")
done = 0


@app.handler(GenerateReport)
async def handle(job: GenerateReport, ctx: JobContext) -> None:
    global done
    ctx.logger.info("running %s", job.account_id)
    done += 1
    if done == {n}:
        os.kill(os.getpid(), signal.SIGTERM)  # the worker drains, then returns


async def main() -> None:
    async with JobProducer(ProducerSettings(transport="memory")) as producer:
        await producer.ensure(["report.generate"])
        for index in range({n}):
            await producer.publish(GenerateReport(account_id=f"a{{index}}", month="2025-01"))
    settings = Settings.model_validate(
        {{"transport": "memory", "health": {{"port": 0}}, "create_missing": True}}
    )
    await run_worker(app, settings)


asyncio.run(main())
"""


def test_a_worker_stopped_by_sigterm_writes_every_job_line() -> None:
    n = 300
    result = subprocess.run(
        [sys.executable, "-c", WORKER.format(n=n)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OTEL_SDK_DISABLED": "true"},
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    jobs = Counter(e["job_id"] for e in entries if e["logger"] == "jobstream.job")
    handled = Counter(e["job_id"] for e in entries if e["logger"] == "jobstream.handler")
    assert len(jobs) == n
    assert set(jobs.values()) == {1}
    assert handled == jobs
    assert {e["outcome"] for e in entries if e["logger"] == "jobstream.job"} == {"completed"}
    assert any("signal SIGTERM: draining" in e["message"] for e in entries)


def test_broker_client_lines_are_json_lines_through_the_same_handler() -> None:
    stream = io.StringIO()
    sys_stderr, sys.stderr = sys.stderr, stream
    try:
        configure_logging(LoggingSettings(level="INFO", format="json"))
        logging.getLogger("aiokafka").error('Unable connect to "%s:%s": %s', "h", 1, "refused")
        logging.getLogger("aiokafka.conn").info("not written: below WARNING")
        logging.getLogger("nats.aio.client").warning("nats says %s", "hi")
    finally:
        sys.stderr = sys_stderr
        for name in ("jobstream", "aiokafka", "nats"):
            for handler in logging.getLogger(name).handlers:
                handler.close()
            logging.getLogger(name).handlers.clear()
            logging.getLogger(name).propagate = True
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["level"], e["logger"], e["message"]) for e in entries] == [
        ("error", "aiokafka", 'Unable connect to "h:1": refused'),
        ("warning", "nats.aio.client", "nats says hi"),
    ]


def test_worker_without_a_broker_writes_only_json_lines_then_the_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSTREAM_")}
    env |= {
        "JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
        "JOBSTREAM_WORKER__BROKER_WAIT_S": "2",
        "JOBSTREAM_HEALTH__PORT": "0",
        "JOBSTREAM_TEST_SINK": os.devnull,
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(
        [JOBSTREAM, "worker", "tests.apps.recorder:app"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    *logged, last = result.stderr.splitlines()
    assert last.startswith("error: kafka is not reachable"), result.stderr
    entries = [json.loads(line) for line in logged]  # no raw "Unable connect" line
    assert any(entry["logger"] == "aiokafka" for entry in entries), result.stderr
