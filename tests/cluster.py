"""Leader failover under load on three-node clusters: nothing lost, one effect per job.

    python -m tests.cluster [--broker kafka|nats|both] [--jobs 20000] [--rate 500]

For each broker: a private three-node cluster (`scripts/cluster.py` on the ports below, never
the `make up` ones), `jobstream topics ensure` (replication 3), 3 `jobstream worker`
processes of `tests.apps.cluster:app` with the shared Redis as idempotency store, and a
producer in this process publishing `--jobs` jobs at `--rate` jobs/s (batches every 50 ms;
a batch that fails is published again with the same job ids). While they run, the faults:

- Kafka: SIGKILL of the broker that leads most partitions, restarted 10 s later; then
  SIGKILL of the KRaft controller (the quorum leader), restarted 10 s later.
- NATS: SIGKILL of the server leading the job stream, restarted 10 s later; then a rolling
  restart (SIGTERM, start, cluster whole again) of the three servers one by one.

One job in 100 fails on every attempt (3 attempts through the retry tiers): it must end in
the dead-letter destination exactly once. Then the effects are counted by job id in
PostgreSQL, the dead letters by job id, and the throughput is measured from the effects'
times: the rate over the 5 s before each kill, and the time from the kill to the end of the
first 2 s window from which on the rate stays at half of it (or of the offered rate, if
lower) or more for 10 s (`measure`). Results are printed and written to
`.run/cluster-failover/<broker>.json`; docs/guarantees.md keeps the figures. `--jobs` /
`--rate` must give at least 30 s of publishing.
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
from typing import Any

import psycopg

from consumer import Settings, backend_for
from consumer.core import DeadLetterFilter
from producer import JobProducer, ProducerSettings, PublishRequest
from tests.apps.cluster import SCHEMA, TABLE, ClusterJob
from tests.support import free_port, http_status

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / ".run" / "cluster-failover"
EFFECTS_URL = os.environ.get(
    "JOBSTREAM_CHAOS_EFFECTS_URL", "postgresql://jobstream@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("JOBSTREAM_TEST_REDIS", "redis://127.0.0.1:6379/0")
# The tests' own clusters (they SIGKILL nodes): Kafka 29292-29297, NATS clients
# 24232-24234, routes 26232-26234, monitoring 28232-28234.
PORTS = {"kafka": 29292, "nats": 24232}
WORKERS = 3
KEYS = 500
FAIL_EVERY = 100
OUTAGE_S = 10.0
MIN_PUBLISHING_S = 30.0
BATCH_EVERY_S = 0.05
DRAIN_DEADLINE_S = 300.0


class Cluster:
    """One private three-node cluster, driven through `scripts/cluster.py`."""

    def __init__(self, kind: str, home: Path) -> None:
        self.kind = kind
        self.home = home
        self.env = {
            **os.environ,
            "JOBSTREAM_CLUSTER_RUN_DIR": str(home),
            "JOBSTREAM_CLUSTER_KAFKA_PORT": str(PORTS["kafka"]),
            "JOBSTREAM_CLUSTER_NATS_PORT": str(PORTS["nats"]),
        }

    def _script(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts/cluster.py"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        if result.returncode != 0:
            msg = f"cluster.py {' '.join(args)} failed: {result.stderr.strip()[-800:]}"
            raise RuntimeError(msg)
        return result.stdout

    def up(self) -> None:
        self._script("up", self.kind)

    def down(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._script("down", self.kind)

    def kill(self, node: int) -> None:
        self._script("kill", self.kind, str(node))

    def start(self, node: int) -> None:
        self._script("start", self.kind, str(node))

    def leaders(self) -> dict[str, Any]:
        answer = json.loads(self._script("leaders", self.kind))
        assert isinstance(answer, dict)
        return answer

    def stop_gracefully(self, node: int) -> None:
        pid = int((self.home / f"{self.kind}-{node}" / "pid").read_text())
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        self.kill(node)  # waits until it is gone (SIGKILL only after 30 s)

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{PORTS['kafka'] + 2 * n}" for n in range(3))

    @property
    def nats_urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{PORTS['nats'] + n}" for n in range(3)]


@dataclass
class Fault:
    what: str
    node: int
    killed_at: float  # epoch seconds
    restarted_at: float = 0.0
    rate_before: float = 0.0  # jobs/s over the 5 s before the kill
    recovered_s: float | None = None  # kill -> end of the first 2 s window at >= half, kept
    rate_after: float = 0.0  # jobs/s over the 5 s after recovery


@dataclass
class Result:
    broker: str
    jobs: int
    rate: float
    failing: int = 0
    effects: int = 0
    lost: int = 0
    duplicated: int = 0
    dead_letters: int = 0
    dead_letters_missing: int = 0
    dead_letters_duplicated: int = 0
    confirmed: int = 0
    confirmed_lost: int = 0
    publish_errors: int = 0
    longest_publish_stall_s: float = 0.0
    worker_exits: list[int] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    rolling_restart_s: float = 0.0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        recovered = all(f.recovered_s is not None and f.recovered_s <= 30 for f in self.faults)
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.confirmed_lost == 0
            and self.dead_letters_missing == 0
            and self.dead_letters_duplicated == 0
            and not self.worker_exits
            and recovered
        )


def settings_env(broker: str, cluster: Cluster, run: str) -> dict[str, str]:
    name = run.replace("-", "_")
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "JOBSTREAM_TRANSPORT": broker,
        "JOBSTREAM_JOB_MODULES": json.dumps(["tests.apps.cluster"]),
        "JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS": cluster.bootstrap,
        "JOBSTREAM_NATS__SERVERS": json.dumps(cluster.nats_urls),
        "JOBSTREAM_ROUTING__TOPIC_PREFIX": f"{run}.",
        "JOBSTREAM_ROUTING__SUBJECT_PREFIX": f"{run}.",
        "JOBSTREAM_ROUTING__STREAM": name.upper(),
        "JOBSTREAM_ROUTING__PARTITIONS": "6",
        "JOBSTREAM_WORKER__GROUP": name,
        "JOBSTREAM_RETRY__TIERS_S": "[0.5, 2.0]",
        "JOBSTREAM_RETRY__POLICY__MAX_ATTEMPTS": "3",
        "JOBSTREAM_RETRY__POLICY__INITIAL_DELAY_S": "0.5",
        "JOBSTREAM_IDEMPOTENCY__BACKEND": "redis",
        "JOBSTREAM_IDEMPOTENCY__URL": REDIS_URL,
        "JOBSTREAM_IDEMPOTENCY__NAMESPACE": name,
        "JOBSTREAM_LOGGING__LEVEL": "WARNING",
        "JOBSTREAM_CHAOS_EFFECTS_URL": EFFECTS_URL,
        "JOBSTREAM_CHAOS_RUN": run,
    }


class Workers:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.running: list[tuple[subprocess.Popen[bytes], int]] = []

    def start(self) -> None:
        port = free_port()
        with (self.logs / f"worker-{len(self.running)}.log").open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "jobstream", "worker", "tests.apps.cluster:app"],
                env={**self.env, "JOBSTREAM_HEALTH__PORT": str(port)},
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.running.append((process, port))

    async def ready(self) -> None:
        deadline = time.monotonic() + 120
        while not all(http_status(port, "/readyz") == 200 for _, port in self.running):
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not ready after 120 s; see {self.logs}")
            await asyncio.sleep(0.2)

    def exited(self) -> list[int]:
        return [p.returncode for p, _ in self.running if p.poll() is not None]

    def stop(self) -> list[int]:
        for process, _ in self.running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = []
        for process, _ in self.running:
            try:
                codes.append(process.wait(timeout=60))
            except subprocess.TimeoutExpired:
                process.kill()
                codes.append(process.wait())
        return codes


class Producer:
    """Publishes `jobs` jobs at `rate` jobs/s; a failed batch is published again with the
    same ids until confirmed. `confirmed` holds the ids the producer reported published."""

    def __init__(self, settings: ProducerSettings, run: str, jobs: int, rate: float) -> None:
        self.settings, self.name, self.jobs, self.rate = settings, run, jobs, rate
        self.confirmed: set[str] = set()
        self.errors = 0
        self.longest_stall_s = 0.0

    def request(self, seq: int) -> PublishRequest:
        job = ClusterJob(seq=seq, fail=seq % FAIL_EVERY == 7)
        return PublishRequest(job, key=f"k{seq % KEYS}", id=f"{self.name}-{seq}")

    async def run(self) -> None:
        per_batch = max(1, round(self.rate * BATCH_EVERY_S))
        started = time.monotonic()
        last_ok = started
        async with JobProducer(self.settings) as producer:
            for first in range(0, self.jobs, per_batch):
                due = started + (first / per_batch) * BATCH_EVERY_S
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                batch = [self.request(s) for s in range(first, min(first + per_batch, self.jobs))]
                give_up = time.monotonic() + 120
                while True:
                    try:
                        receipts = await producer.publish_many(batch)
                    except Exception:  # any failure: the same batch again, same job ids
                        self.errors += 1
                        if time.monotonic() > give_up:
                            raise
                        await asyncio.sleep(0.2)
                        continue
                    break
                now = time.monotonic()
                self.longest_stall_s = max(self.longest_stall_s, now - last_ok)
                last_ok = now
                self.confirmed.update(r.job_id for r in receipts)


async def effect_times(conn: psycopg.AsyncConnection, run: str) -> list[float]:
    cursor = await conn.execute(
        f"SELECT extract(epoch FROM at) FROM {TABLE} WHERE run = %s ORDER BY at", (run,)
    )
    return [float(row[0]) for row in await cursor.fetchall()]


async def count_done(conn: psycopg.AsyncConnection, run: str) -> int:
    cursor = await conn.execute(
        f"SELECT count(DISTINCT job_id) FROM {TABLE} WHERE run = %s", (run,)
    )
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


def measure(
    fault: Fault, times: list[float], until: float | None = None, offered: float | None = None
) -> None:
    """Fill the fault's rates and recovery time from the effects' times (epoch seconds).

    Recovered at the start T of the first 2 s window after the kill from which on every
    2 s window for 10 s (or until the last effect, or `until`: the next fault) runs at half
    the rate before the kill or more: a window right at the kill still holds the work in
    flight before the stall, so a single window would call a stall that comes a second late
    "no stall". The baseline is the `offered` rate where the rate before is higher (right
    after catching up on a backlog it is above what the producer offers)."""

    def rate(start: float, seconds: float) -> float:
        return sum(1 for t in times if start <= t < start + seconds) / seconds

    fault.rate_before = round(rate(fault.killed_at - 5, 5), 1)
    last = times[-1] if times else fault.killed_at
    last = min(last, until) if until is not None else last
    baseline = min(fault.rate_before, offered) if offered is not None else fault.rate_before
    half = baseline / 2
    for step in range(240):
        start = fault.killed_at + step / 2
        ahead = [start + k / 2 for k in range(21) if start + k / 2 + 2 <= last]
        if ahead and all(rate(t, 2) >= half for t in ahead):
            fault.recovered_s = step / 2 + 2
            fault.rate_after = round(rate(start, 5), 1)
            return


async def dead_letter_ids(env: dict[str, str]) -> list[str]:
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        settings = Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    backend = backend_for(settings.transport)
    destinations = backend.dead_letter_destinations(settings, [ClusterJob.job_type])
    records = await backend.find_dead_letters(settings, destinations, DeadLetterFilter())
    return [r.job_id or "" for r in records]


def jobstream(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "jobstream", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if result.returncode != 0:
        raise RuntimeError(f"jobstream {' '.join(args)} failed: {result.stderr[-800:]}")
    return result.stdout


async def failover(
    broker: str, cluster: Cluster, jobs: int, rate: float, *, rolling: bool = True
) -> Result:
    """One run on a cluster that is up (and whole again when it returns)."""
    run = f"cl{broker[0]}{uuid.uuid4().hex[:8]}"
    logs = cluster.home / run
    logs.mkdir(parents=True)
    env = settings_env(broker, cluster, run)
    result = Result(broker, jobs, rate, failing=len(range(7, jobs, FAIL_EVERY)))
    jobstream(env, "topics", "ensure")
    workers = Workers(env, logs)
    producer_settings = ProducerSettings(
        transport=broker,  # type: ignore[arg-type]
        kafka={"bootstrap_servers": cluster.bootstrap},
        nats={"servers": cluster.nats_urls},
        routing={"topic_prefix": f"{run}.", "subject_prefix": f"{run}.", "stream": run.upper()},
    )
    producer = Producer(producer_settings, run, jobs, rate)
    async with await psycopg.AsyncConnection.connect(EFFECTS_URL, autocommit=True) as conn:
        await conn.execute(SCHEMA)
        for _ in range(WORKERS):
            workers.start()
        try:
            await workers.ready()
            started = time.monotonic()
            publishing = asyncio.create_task(producer.run())
            duration = jobs / rate
            await faults(cluster, run.upper(), result, duration, started, rolling=rolling)
            await publishing
            deadline = time.monotonic() + DRAIN_DEADLINE_S
            done = 0
            while time.monotonic() < deadline:
                done = await count_done(conn, run)
                result.worker_exits = workers.exited()
                if done >= jobs - result.failing or result.worker_exits:
                    break  # all done, or a worker exited: the run failed, no use waiting
                await asyncio.sleep(0.5)
            letters: list[str] = []
            while time.monotonic() < deadline and not result.worker_exits:
                letters = await dead_letter_ids(env)
                if len(set(letters)) >= result.failing:
                    break
                await asyncio.sleep(1)
            await asyncio.sleep(2)  # a late duplicate effect or dead letter would show now
            letters = await dead_letter_ids(env)
            result.seconds = round(time.monotonic() - started, 1)
            result.worker_exits = workers.exited()
        finally:
            codes = workers.stop()
        assert codes == [0] * WORKERS or result.worker_exits, codes
        await tally(conn, run, producer, letters, result)
    return result


async def faults(
    cluster: Cluster,
    stream: str,
    result: Result,
    duration: float,
    started: float,
    *,
    rolling: bool,
) -> None:
    async def at(fraction: float) -> None:
        await asyncio.sleep(max(0.0, started + duration * fraction - time.monotonic()))

    async def crash_and_restart(what: str, node: int) -> None:
        fault = Fault(what, node, time.time())
        await asyncio.to_thread(cluster.kill, node)
        result.faults.append(fault)
        await asyncio.sleep(OUTAGE_S)
        fault.restarted_at = time.time()
        await asyncio.to_thread(cluster.start, node)

    await at(0.2)
    leaders = await asyncio.to_thread(cluster.leaders)
    if cluster.kind == "kafka":
        counts: dict[str, int] = leaders["partition_leaders"]
        node = int(max(counts, key=lambda n: counts[n]))
        await crash_and_restart("partition leader", node)
        await at(0.7)
        controller = (await asyncio.to_thread(cluster.leaders))["controller"]
        await crash_and_restart("controller", int(controller))
        return
    stream_leader = leaders["stream_leaders"][stream]
    await crash_and_restart("stream leader", int(str(stream_leader).removeprefix("n")))
    if rolling:
        await at(0.7)
        began = time.monotonic()
        result.faults.append(Fault("rolling restart", 0, time.time()))
        for node in (1, 2, 3):
            await asyncio.to_thread(cluster.stop_gracefully, node)
            await asyncio.to_thread(cluster.start, node)
        result.faults[-1].restarted_at = time.time()
        result.rolling_restart_s = round(time.monotonic() - began, 1)


async def tally(
    conn: psycopg.AsyncConnection,
    run: str,
    producer: Producer,
    letters: list[str],
    result: Result,
) -> None:
    cursor = await conn.execute(f"SELECT job_id FROM {TABLE} WHERE run = %s", (run,))
    ids = [row[0] for row in await cursor.fetchall()]
    succeeding = {f"{run}-{s}" for s in range(result.jobs) if s % FAIL_EVERY != 7}
    failing = {f"{run}-{s}" for s in range(result.jobs) if s % FAIL_EVERY == 7}
    result.effects = len(ids)
    result.lost = len(succeeding - set(ids))
    result.duplicated = len(ids) - len(set(ids))
    result.dead_letters = len(letters)
    result.dead_letters_missing = len(failing - set(letters))
    result.dead_letters_duplicated = len(letters) - len(set(letters))
    result.confirmed = len(producer.confirmed)
    result.confirmed_lost = len((producer.confirmed & succeeding) - set(ids)) + len(
        (producer.confirmed & failing) - set(letters)
    )
    result.publish_errors = producer.errors
    result.longest_publish_stall_s = round(producer.longest_stall_s, 2)
    times = await effect_times(conn, run)
    kills = [f.killed_at for f in result.faults[1:]] + [None]
    for fault, until in zip(result.faults, kills, strict=True):
        measure(fault, times, until, result.rate)


def fresh_cluster(broker: str, home: Path) -> Cluster:
    cluster = Cluster(broker, home)
    if home.exists():
        cluster.down()  # what an interrupted run left behind, before its pid files go
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    cluster.up()
    return cluster


def report(result: Result) -> str:
    return json.dumps({**asdict(result), "ok": result.ok})


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--broker", choices=["kafka", "nats", "both"], default="both")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=500.0)
    args = parser.parse_args()
    if args.rate <= 0 or args.jobs / args.rate < MIN_PUBLISHING_S:
        parser.error(
            f"--jobs / --rate must give at least {MIN_PUBLISHING_S:.0f} s of publishing (the "
            f"faults need it: {OUTAGE_S:.0f} s outages and a recovery to measure after each); "
            "publish more jobs or lower the rate"
        )
    brokers = ["kafka", "nats"] if args.broker == "both" else [args.broker]
    failed = False
    for broker in brokers:
        cluster = fresh_cluster(broker, RUN / broker)
        try:
            result = asyncio.run(failover(broker, cluster, args.jobs, args.rate))
        finally:
            cluster.down()
        (RUN / f"{broker}.json").write_text(report(result) + "\n")
        print(report(result))
        failed |= not result.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
