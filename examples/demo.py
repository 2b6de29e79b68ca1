"""`make demo`: the whole product on the local brokers, in about half a minute.

Provisions the topics, starts the HTTP ingress (with the dashboard at `/ui`) and two
workers (separate processes, one consumer group), submits a mix of example jobs over HTTP,
shows their states live, cancels a long report while it runs, and ends with a summary of
every job, the dead letter of the job that always fails, and, with `--jaeger`, the retried
job's trace read back from Jaeger and drawn as a tree (`examples/trace_tree.py`), with its
URL in Jaeger and the job's page in the dashboard. Stops every process it started (with
`--hold`, only after Enter, so the URLs can be opened); exits 0 only if every job ended as
expected (and, with `--jaeger`, its trace is complete). Needs Kafka and Redis (`make up`);
with `--transport nats`, NATS instead of Kafka; with `--jaeger`, Jaeger (OTLP on
`--otlp`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from examples.trace_tree import Span, draw, wait_for_trace, walk

ROOT = Path(__file__).resolve().parent.parent
FINAL = {"succeeded", "dead_lettered", "cancelled", "failed"}


@dataclass
class Submitted:
    label: str
    job_type: str
    job_id: str
    expected: str
    trace_id: str | None
    state: str = "pending"
    attempts: int = 0
    last_error: str | None = None


SUBMISSIONS: list[tuple[str, str, dict[str, object], str]] = [
    (
        "welcome Ada",
        "email.welcome",
        {"user_id": "u-1", "email": "ada@example.com", "name": "Ada", "marketing_opt_in": True},
        "succeeded",
    ),
    (
        "welcome Lin",
        "email.welcome",
        {"user_id": "u-2", "email": "lin@example.com", "name": "Lin", "marketing_opt_in": False},
        "succeeded",
    ),
    (
        "welcome Ola",
        "email.welcome",
        {"user_id": "u-3", "email": "ola@example.com", "name": "Ola", "marketing_opt_in": False},
        "succeeded",
    ),
    (
        "resize avatar",
        "image.resize",
        {
            "upload_id": "up-1",
            "source_url": "https://img.example.com/a.png",
            "width": 128,
            "height": 128,
        },
        "succeeded",
    ),
    (
        "resize banner (fails once)",
        "image.resize",
        {
            "upload_id": "flaky-2",
            "source_url": "https://img.example.com/b.png",
            "width": 1200,
            "height": 300,
        },
        "succeeded",
    ),
    (
        "resize photo (fails once)",
        "image.resize",
        {
            "upload_id": "flaky-3",
            "source_url": "https://img.example.com/c.png",
            "width": 640,
            "height": 480,
        },
        "succeeded",
    ),
    (
        "resize scan (always fails)",
        "image.resize",
        {
            "upload_id": "up-4",
            "source_url": "https://img.example.com/corrupt.png",
            "width": 800,
            "height": 600,
        },
        "dead_lettered",
    ),
    ("report acme", "report.generate", {"account_id": "acme", "month": "2026-10"}, "succeeded"),
    (
        "report slow (cancelled)",
        "report.generate",
        {"account_id": "slow", "month": "2026-10"},
        "cancelled",
    ),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _environment(transport: str, port: int, jaeger: str | None, otlp: str) -> dict[str, str]:
    tracing = (
        {
            # Traces to the local Jaeger over OTLP/HTTP, exported every 200 ms so the trace
            # is complete soon after the job ends; metrics stay on /metrics (Jaeger takes
            # no metrics).
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_METRICS_EXPORTER": "prometheus",
            "JOBSTREAM_UI__JAEGER_URL": jaeger,
        }
        if jaeger
        else {}
    )
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "JOBSTREAM_TRANSPORT": transport,
        "JOBSTREAM_JOB_MODULES": '["schemas.examples"]',
        "JOBSTREAM_WORKER__GROUP": "jobstream-demo",
        "JOBSTREAM_WORKER__COMMIT_INTERVAL_S": "0.5",
        "JOBSTREAM_RETRY__TIERS_S": "[1, 5]",
        "JOBSTREAM_RETRY__POLICY": '{"max_attempts": 3, "initial_delay_s": 1, "jitter": 0.1}',
        "JOBSTREAM_STATUS__BACKEND": "redis",
        "JOBSTREAM_STATUS__URL": os.environ.get("JOBSTREAM_DEMO_REDIS", "redis://127.0.0.1:6379/0"),
        "JOBSTREAM_STATUS__NAMESPACE": "jobstream-demo",
        "JOBSTREAM_STATUS__CANCEL_POLL_S": "0.2",
        "JOBSTREAM_INGRESS__PORT": str(port),
        "JOBSTREAM_HEALTH__PORT": "0",
        "JOBSTREAM_LOGGING__LEVEL": "INFO",  # one JSON line per job, in .run/demo/*.log
        **tracing,
    }


def _start(
    args: list[str], env: dict[str, str], log: Path, service: str
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "jobstream", *args],
            env={**env, "OTEL_SERVICE_NAME": service},
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _table(jobs: list[Submitted], title: str) -> Table:
    table = Table(title=title)
    for column in ("job", "type", "job id", "state", "attempts", "last error"):
        table.add_column(column, overflow="fold")
    style = {"succeeded": "green", "dead_lettered": "red", "cancelled": "yellow"}
    for job in jobs:
        state = f"[{style.get(job.state, 'cyan')}]{job.state}[/]"
        table.add_row(
            job.label,
            job.job_type,
            job.job_id[:8],
            state,
            str(job.attempts),
            (job.last_error or "")[:60],
        )
    return table


async def _submit(http: httpx.AsyncClient) -> list[Submitted]:
    jobs = []
    run = uuid.uuid4().hex[:6]  # this run's keys: never queued behind an older run's jobs
    for label, job_type, payload, expected in SUBMISSIONS:
        key = f"{label} {run}"
        response = await http.post(f"/v1/jobs/{job_type}", json=payload, params={"key": key})
        if response.status_code != 202:
            msg = f"POST /v1/jobs/{job_type} answered {response.status_code}: {response.text}"
            raise RuntimeError(msg)
        body = response.json()
        jobs.append(Submitted(label, job_type, body["job_id"], expected, body.get("trace_id")))
    return jobs


async def _follow(http: httpx.AsyncClient, jobs: list[Submitted], console: Console) -> None:
    cancel_sent_at = 0.0
    deadline = time.monotonic() + 90
    with Live(_table(jobs, "jobs (live)"), console=console, refresh_per_second=4) as live:
        while time.monotonic() < deadline:
            for job in jobs:
                response = await http.get(f"/v1/jobs/{job.job_id}")
                if response.status_code == 200:
                    body = response.json()
                    job.state, job.attempts = body["state"], body["attempts"]
                    job.last_error = body.get("last_error")
                # Cancel the long report once it runs; the request is idempotent, so a client
                # repeats it until the job's state says it took effect.
                running = job.expected == "cancelled" and job.state == "running"
                if running and time.monotonic() - cancel_sent_at > 2:
                    await http.post(f"/v1/jobs/{job.job_id}/cancel")
                    cancel_sent_at = time.monotonic()
            live.update(_table(jobs, "jobs (live)"))
            if all(job.state in FINAL for job in jobs):
                return
            await asyncio.sleep(0.3)


async def _dead_letter(job: Submitted) -> dict[str, object] | None:
    from consumer import Settings, backend_for  # noqa: PLC0415 - imported once the env is set
    from consumer.core import DeadLetterFilter  # noqa: PLC0415

    settings = Settings()
    backend = backend_for(settings.transport)
    where = DeadLetterFilter(ids=frozenset({job.job_id}))
    destinations = backend.dead_letter_destinations(settings, [job.job_type])
    for _ in range(20):  # the dead letter is written just before the job's state is
        found = await backend.find_dead_letters(settings, destinations, where)
        if found:
            return found[0].summary()
        await asyncio.sleep(0.25)
    return None


def provision(env: dict[str, str], console: Console) -> bool:
    ensure = subprocess.run(
        [sys.executable, "-m", "jobstream", "topics", "ensure"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if ensure.returncode != 0:
        console.print(f"[red]topics ensure failed:[/] {ensure.stderr.strip()}")
    return ensure.returncode == 0


def _complete(transport: str) -> Callable[[list[Span]], bool]:
    """Whether a retried job's trace holds its whole story (on NATS a retry is a delayed
    redelivery of the same message: there is no hand-off record to publish)."""
    wanted = {"request", "publish", "attempt 1 failed", "attempt 2 completed"}
    if transport == "kafka":
        wanted.add("retry hand-off")

    def complete(roots: list[Span]) -> bool:
        return wanted <= {span.role() for span in walk(roots)}

    return complete


async def _trace(console: Console, job: Submitted, jaeger: str, transport: str, port: int) -> bool:
    """Print the job's trace from Jaeger as a tree, with its URLs; False if incomplete."""
    if not job.trace_id:
        console.print("[red]the ingress returned no trace id: is tracing on?[/]")
        return False
    console.print(f"reading the trace of a retried job ({job.label}) back from Jaeger ...")
    complete = _complete(transport)
    roots = await asyncio.to_thread(wait_for_trace, jaeger, job.trace_id, complete)
    console.print(f"[bold]trace of a retried job[/] {job.trace_id}", highlight=False)
    for line in draw(roots):
        console.print("  " + line, highlight=False, markup=False, soft_wrap=True)
    console.print(f"in Jaeger:     {jaeger}/trace/{job.trace_id}", highlight=False, soft_wrap=True)
    # The Jaeger `make up` builds from source has no web UI assets: its API is complete.
    api = f"{jaeger}/api/traces/{job.trace_id}"
    console.print(
        f"Jaeger's API:  {api} (what the tree above was read from)", highlight=False, soft_wrap=True
    )
    dashboard = f"http://127.0.0.1:{port}/ui/jobs/{job.job_id}"
    console.print(f"in dashboard:  {dashboard}", highlight=False, soft_wrap=True)
    if not complete(roots):
        console.print("[red]the trace is incomplete: spans are missing (see .run/demo/*.log)[/]")
        return False
    return True


async def _hold(console: Console) -> None:
    """Until Enter (a Ctrl-C under make would stop make before its clean-up)."""
    console.print("everything keeps running for the URLs above: press Enter to stop")
    await asyncio.to_thread(sys.stdin.readline)  # returns at once without a terminal


async def main(
    env: dict[str, str],
    console: Console,
    transport: str,
    port: int,
    jaeger: str | None = None,
    *,
    hold: bool = False,
) -> int:
    logs = ROOT / ".run" / "demo"
    logs.mkdir(parents=True, exist_ok=True)
    processes = [_start(["ingress"], env, logs / "ingress.log", "demo-ingress")]
    processes += [
        _start(["worker", "examples.app:app"], env, logs / f"worker-{i}.log", f"demo-worker-{i}")
        for i in (1, 2)
    ]
    console.print(
        f"started the ingress on http://127.0.0.1:{port} (dashboard: /ui) and 2 workers "
        f"(logs in {logs}){'; traces go to Jaeger at ' + jaeger if jaeger else ''}"
    )
    traced_ok = jaeger is None
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            for _ in range(200):
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            jobs = await _submit(http)
            console.print(f"submitted {len(jobs)} jobs over HTTP (POST /v1/jobs/<type>)")
            await _follow(http, jobs, console)
        console.print(_table(jobs, "summary"))
        dead = next(job for job in jobs if job.expected == "dead_lettered")
        letter = await _dead_letter(dead)
        if letter:
            console.print("[bold]dead letter[/] " + json.dumps(letter, indent=2))
        traced = next(job for job in jobs if job.label.startswith("resize banner"))
        if jaeger:
            traced_ok = await _trace(console, traced, jaeger, transport, port)
        elif traced.trace_id:
            console.print(f"trace of a retried job: {traced.trace_id}")
        if hold:
            await _hold(console)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(60) for process in processes]
    wrong = [job for job in jobs if job.state != job.expected]
    console.print(
        f"{len(jobs) - len(wrong)} of {len(jobs)} jobs ended as expected; "
        f"processes exited with {codes}"
    )
    ok = not wrong and letter is not None and traced_ok and codes == [0, 0, 0]
    return 0 if ok else 1


def cli() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--transport", choices=["kafka", "nats"], default="kafka")
    parser.add_argument(
        "--jaeger",
        default=os.environ.get("JOBSTREAM_DEMO_JAEGER") or None,
        help="Jaeger's query URL (e.g. http://127.0.0.1:16686): trace everything, draw the "
        "retried job's trace",
    )
    parser.add_argument(
        "--otlp", default="http://127.0.0.1:4318", help="Jaeger's OTLP/HTTP endpoint"
    )
    parser.add_argument("--hold", action="store_true", help="Keep running until Enter.")
    args = parser.parse_args()
    transport, jaeger = args.transport, args.jaeger
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)
    port = _free_port()
    env = _environment(transport, port, jaeger, args.otlp)
    os.environ.update({k: v for k, v in env.items() if k.startswith("JOBSTREAM_")})
    console.print(f"[bold]jobstream demo[/] on {transport}: provisioning topics ...")
    if not provision(env, console):
        return 1
    return asyncio.run(main(env, console, transport, port, jaeger, hold=args.hold))


if __name__ == "__main__":
    sys.exit(cli())
