"""`make chaos`: faults an operator would meet, during 20,000 jobs, on Kafka and on NATS.

    python -m tests.chaos [--broker kafka|nats|both] [--jobs 20000] [--kills 20]

For each broker: a private broker and a private PostgreSQL idempotency store are started
on ports of their own (the services `make up` runs are not touched, except the PostgreSQL
that holds the effects table, which is never restarted). The jobs are published with the
`jobstream publish` CLI; 3 `jobstream worker` processes of `tests.apps.chaos:app` run them.
While they work, at points spread over the progress: `--kills` SIGKILLs of a worker (each
replaced at once), one SIGKILL and restart of the broker and one of the idempotency store.
Then the effects are counted by job id. The run fails (exit 1) when a job has no effect, or
when a job ran twice and none of its runs was in a process that was SIGKILLed. Results are
printed and written to `.run/chaos/<broker>.json`; docs/guarantees.md keeps the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psycopg

from tests.apps.chaos import SCHEMA, TABLE
from tests.support import free_port, http_status

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / ".run" / "chaos"
EFFECTS_URL = os.environ.get(
    "JOBSTREAM_CHAOS_EFFECTS_URL", "postgresql://jobstream@127.0.0.1:5432/postgres"
)
PORTS = {"kafka": "19592", "nats": "14722", "postgres": "15832"}
WORKERS = 3
KEYS = 500
OUTAGE_S = 5.0
DEADLINE_S = 900.0


@dataclass
class Result:
    broker: str
    jobs: int
    workers: int
    kills: int
    broker_restarts: int = 0
    store_restarts: int = 0
    effects: int = 0
    lost: int = 0
    duplicated: int = 0
    extra_runs: int = 0
    duplicated_unexplained: int = 0
    keys_out_of_order: int = 0
    exit_codes: list[int] = field(default_factory=list)
    unexpected_exits: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        clean_exit = all(code == 0 for code in self.exit_codes) and not self.unexpected_exits
        return self.lost == 0 and self.duplicated_unexplained == 0 and clean_exit


class Services:
    """The private broker and store of one chaos run (`scripts/services.py` on own ports)."""

    def __init__(self, broker: str, home: Path) -> None:
        self.broker = broker
        self.home = home
        self.env = {
            **os.environ,
            "JOBSTREAM_LOCAL_RUN_DIR": str(home),
            "JOBSTREAM_LOCAL_KAFKA_PORT": PORTS["kafka"],
            "JOBSTREAM_LOCAL_NATS_PORT": PORTS["nats"],
            "JOBSTREAM_LOCAL_POSTGRES_PORT": PORTS["postgres"],
        }

    def up(self, *names: str) -> None:
        subprocess.run(
            [sys.executable, "scripts/services.py", "up", *names],
            env=self.env,
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def down(self) -> None:
        subprocess.run(
            [sys.executable, "scripts/services.py", "down", self.broker, "postgres"],
            env=self.env,
            cwd=ROOT,
            check=False,
            stdout=subprocess.DEVNULL,
        )

    def crash(self, name: str) -> None:
        """SIGKILL the service's whole process group, as a crash would."""
        pid = int((self.home / name / "pid").read_text())
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        while Path(f"/proc/{pid}").exists() and _state(pid) != "Z":
            time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def worker_env(broker: str, run: str, store_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "JOBSTREAM_TRANSPORT": broker,
        "JOBSTREAM_JOB_MODULES": json.dumps(["tests.apps.chaos"]),
        "JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{PORTS['kafka']}",
        "JOBSTREAM_NATS__SERVERS": json.dumps([f"nats://127.0.0.1:{PORTS['nats']}"]),
        "JOBSTREAM_ROUTING__PARTITIONS": "6",
        "JOBSTREAM_WORKER__GROUP": "chaos",
        "JOBSTREAM_WORKER__MAX_IN_FLIGHT": "4",
        "JOBSTREAM_RETRY__TIERS_S": "[0.5, 2.0]",
        "JOBSTREAM_IDEMPOTENCY__BACKEND": "postgres",
        "JOBSTREAM_IDEMPOTENCY__URL": store_url,
        "JOBSTREAM_IDEMPOTENCY__LEASE_S": "10",
        "JOBSTREAM_LOGGING__LEVEL": "WARNING",
        "JOBSTREAM_CHAOS_EFFECTS_URL": EFFECTS_URL,
        "JOBSTREAM_CHAOS_RUN": run,
    }


def jobstream(env: dict[str, str], *args: str, stdin: bytes | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "jobstream", *args],
        env=env,
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        check=False,
        timeout=600,
    )
    if result.returncode != 0:
        raise SystemExit(f"jobstream {' '.join(args)} failed: {result.stderr.decode()[-600:]}")
    return result.stdout.decode()


class Workers:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.running: list[tuple[subprocess.Popen[bytes], int]] = []
        self.killed: set[int] = set()
        self.started = 0

    def start(self) -> None:
        port = free_port()
        with (self.logs / f"worker-{self.started}.log").open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "jobstream", "worker", "tests.apps.chaos:app"],
                env={**self.env, "JOBSTREAM_HEALTH__PORT": str(port)},
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.started += 1
        self.running.append((process, port))

    async def ready(self) -> None:
        deadline = time.monotonic() + 90
        while not all(http_status(port, "/readyz") == 200 for _, port in self.running):
            if time.monotonic() > deadline:
                raise SystemExit(f"workers not ready after 90 s; see {self.logs}")
            await asyncio.sleep(0.2)

    def kill(self, turn: int) -> None:
        process, _ = self.running.pop(turn % len(self.running))
        process.send_signal(signal.SIGKILL)
        process.wait()
        self.killed.add(process.pid)
        self.start()

    def restart_exited(self) -> list[int]:
        """Like Kubernetes: a worker that exited by itself is started again. Its exit
        codes are returned (none is expected: every fault here is survivable)."""
        exited = [(process, port) for process, port in self.running if process.poll() is not None]
        for entry in exited:
            self.running.remove(entry)
            self.start()
        return [process.returncode for process, _ in exited]

    def stop(self) -> list[int]:
        for process, _ in self.running:
            process.send_signal(signal.SIGTERM)
        return [process.wait(timeout=60) for process, _ in self.running]


async def count_done(conn: psycopg.AsyncConnection, run: str) -> int:
    cursor = await conn.execute(
        f"SELECT count(DISTINCT job_id) FROM {TABLE} WHERE run = %s",
        (run,),
    )
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def chaos(broker: str, jobs: int, kills: int) -> Result:
    home = RUN / broker
    services = Services(broker, home)
    if home.exists():
        services.down()  # what an interrupted run left behind, before its pid files go
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    run = f"{broker}-{uuid.uuid4().hex[:8]}"
    store_url = f"postgresql://jobstream@127.0.0.1:{PORTS['postgres']}/postgres"
    env = worker_env(broker, run, store_url)
    result = Result(broker, jobs, WORKERS, kills)
    services.up(broker, "postgres")
    try:
        async with await psycopg.AsyncConnection.connect(EFFECTS_URL, autocommit=True) as conn:
            await conn.execute(SCHEMA)
            jobstream(env, "topics", "ensure")
            workers = Workers(env, home)
            for _ in range(WORKERS):
                workers.start()
            await workers.ready()
            # Published once every worker is ready: the faults must land mid-run.
            lines = "".join(
                json.dumps(
                    {
                        "data": {"seq": seq, "work_ms": 20 + seq % 100},
                        "key": f"k{seq % KEYS}",
                        "id": f"{run}-{seq}",
                    }
                )
                + "\n"
                for seq in range(jobs)
            )
            receipts = jobstream(env, "publish", "chaos.effect", "--envelope", stdin=lines.encode())
            assert len(receipts.splitlines()) == jobs, "one receipt per published job"
            started = time.monotonic()
            # Faults at progress points spread over the run: kills, and the two restarts.
            events = [(0.05 + 0.85 * n / kills, "kill") for n in range(kills)]
            events += [(0.33, broker), (0.66, "postgres")]
            events.sort()
            turn = 0
            while (done := await count_done(conn, run)) < jobs:
                if time.monotonic() - started > DEADLINE_S:
                    break
                result.unexpected_exits += workers.restart_exited()
                if events and done >= events[0][0] * jobs:
                    _, what = events.pop(0)
                    if what == "kill":
                        workers.kill(turn)
                        turn += 1
                    else:
                        services.crash(what)
                        await asyncio.sleep(OUTAGE_S)
                        services.up(what)
                        if what == broker:
                            result.broker_restarts += 1
                        else:
                            result.store_restarts += 1
                await asyncio.sleep(0.2)
            result.seconds = round(time.monotonic() - started, 1)
            result.exit_codes = workers.stop()
            result.kills = len(workers.killed)
            await tally(conn, run, jobs, workers.killed, result)
    finally:
        services.down()
    return result


async def tally(
    conn: psycopg.AsyncConnection, run: str, jobs: int, killed: set[int], result: Result
) -> None:
    cursor = await conn.execute(
        f"SELECT job_id, key, seq, pid, at FROM {TABLE} WHERE run = %s ORDER BY at",
        (run,),
    )
    rows = await cursor.fetchall()
    runs: dict[str, list[int]] = {}
    first: dict[str, tuple[str, int]] = {}
    for job_id, key, seq, pid, _ in rows:
        runs.setdefault(job_id, []).append(pid)
        first.setdefault(job_id, (key, seq))
    result.effects = len(rows)
    result.lost = jobs - len(runs)
    duplicated = {job_id: pids for job_id, pids in runs.items() if len(pids) > 1}
    result.duplicated = len(duplicated)
    result.extra_runs = sum(len(pids) - 1 for pids in duplicated.values())
    result.duplicated_unexplained = sum(
        1 for pids in duplicated.values() if not any(pid in killed for pid in pids[:-1])
    )
    # Per key, the first effects must come in publish order (seq rises).
    last: dict[str, int] = {}
    out_of_order: set[str] = set()
    for key, seq in first.values():
        if seq < last.get(key, -1):
            out_of_order.add(key)
        last[key] = max(seq, last.get(key, -1))
    result.keys_out_of_order = len(out_of_order)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=["kafka", "nats", "both"], default="both")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--kills", type=int, default=20)
    args = parser.parse_args()
    brokers = ["kafka", "nats"] if args.broker == "both" else [args.broker]
    failed = False
    for broker in brokers:
        result = asyncio.run(chaos(broker, args.jobs, args.kills))
        report = {**asdict(result), "ok": result.ok}
        (RUN / f"{broker}.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report))
        failed |= not result.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
