"""Effectively once with PostgreSQL, under SIGKILLs: the outbox relay and transactional
handlers (issue 18). `make chaos`-style, not part of CI (small runs are, in
tests/integration/test_outbox_chaos.py).

    python -m tests.chaos_outbox [--broker kafka|nats|both] [--jobs 20000] [--adders 4]
        [--relays 2] [--relay-kills 10] [--workers 3] [--worker-kills 0] [--private]

`--adders` processes add the jobs through `producer.outbox.Outbox` in transactions of 1 to
4 jobs, each with an `orders` row of the same transaction (the business write); every
tenth transaction is rolled back (its job ids are noted outside it). `--relays` `jobstream
outbox relay` replicas publish them; `--workers` `jobstream worker tests.apps.outbox:app`
processes run them with a transactional handler whose effect is a row written through
`ctx.transaction`. While the adders add, `--relay-kills` SIGKILLs hit the relay replica
that holds the lock (each replaced at once); over the processing, `--worker-kills`
SIGKILLs hit a worker (each replaced at once). Then effects are counted by job id:

- lost: a committed order whose job has no effect;
- duplicated: a job with more than one effect (none may have: the effect commits with the
  completion record);
- phantom: an effect of a job whose transaction rolled back;
- interrupted: runs a killed worker began and never committed (each one a kill inside
  the window between effect and completion that a separate store cannot close);
- keys out of order: keys whose effects did not come in insert order (each adder owns its
  keys; Kafka keeps a key's order; NATS without `key_partitions` promises none).

The PostgreSQL holding the outbox, the idempotency store and the effects is never
restarted (the shared one at 5432 by default, `JOBSTREAM_OUTBOX_CHAOS_DB`). `--private`
starts a broker of its own on this helper's ports (Kafka 19692, NATS 14822) through
`scripts/services.py`; without it the shared broker is used, with names of the run's own.
Results: printed, and written to `.run/chaos-outbox/<broker>.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nats
import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from nats.js.api import AckPolicy, ConsumerConfig
from psycopg import sql

from producer import ProducerSettings
from producer.outbox import Outbox
from tests.apps.outbox import OutboxEffect, effects_ddl
from tests.support import free_port, http_status

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / ".run" / "chaos-outbox"
DB = os.environ.get("JOBSTREAM_OUTBOX_CHAOS_DB", "postgresql://jobstream@127.0.0.1:5432/postgres")
PRIVATE_PORTS = {"kafka": "19692", "nats": "14822"}
SHARED = {"kafka": "127.0.0.1:9092", "nats": "nats://127.0.0.1:4222"}
KEYS_PER_ADDER = 50
DEADLINE_S = 1800.0


@dataclass
class Result:
    broker: str
    jobs: int
    adders: int
    relays: int
    workers: int
    relay_kills: int = 0
    worker_kills: int = 0
    committed: int = 0
    rolled_back: int = 0
    effects: int = 0
    lost: int = 0
    duplicated: int = 0
    phantom: int = 0
    interrupted: int = 0
    """Runs begun by a worker that was SIGKILLed before they committed (rolled back)."""
    keys_out_of_order: int = 0
    published_out_of_order: int = 0
    """Keys whose records on the broker (first copies) left insert order: the relay's own
    order, whatever the workers do with it."""
    published: int = 0
    """Records on the broker, re-published copies included (NATS drops repeats within its
    duplicate window)."""
    keys: int = 0
    add_seconds: float = 0.0
    seconds: float = 0.0
    worker_exits: list[int] = field(default_factory=list)
    relay_exits: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.phantom == 0


@dataclass(frozen=True)
class Names:
    run: str

    @property
    def outbox(self) -> str:
        return f"ob_{self.run}"

    @property
    def orders(self) -> str:
        return f"orders_{self.run}"

    @property
    def rolled(self) -> str:
        return f"rolled_{self.run}"

    @property
    def effects(self) -> str:
        return f"fx_{self.run}"

    @property
    def namespace(self) -> str:
        return f"ns_{self.run}"


def environment(broker: str, names: Names, address: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "JOBSTREAM_TRANSPORT": broker,
        "JOBSTREAM_JOB_MODULES": json.dumps(["tests.apps.outbox"]),
        "JOBSTREAM_ROUTING__PARTITIONS": "6",
        "JOBSTREAM_ROUTING__TOPIC_PREFIX": f"ob-{names.run}.",
        "JOBSTREAM_ROUTING__SUBJECT_PREFIX": f"ob{names.run}.",
        "JOBSTREAM_ROUTING__STREAM": f"OB_{names.run}",
        "JOBSTREAM_WORKER__GROUP": f"ob-{names.run}",
        "JOBSTREAM_WORKER__MAX_IN_FLIGHT": "4",
        "JOBSTREAM_WORKER__SESSION_TIMEOUT_S": "10",
        "JOBSTREAM_RETRY__TIERS_S": "[0.5, 2.0]",
        "JOBSTREAM_IDEMPOTENCY__BACKEND": "postgres",
        "JOBSTREAM_IDEMPOTENCY__URL": DB,
        "JOBSTREAM_IDEMPOTENCY__NAMESPACE": names.namespace,
        "JOBSTREAM_IDEMPOTENCY__LEASE_S": "10",
        "JOBSTREAM_JETSTREAM__ACK_WAIT_S": "10",
        "JOBSTREAM_LOGGING__LEVEL": "WARNING",
        "JOBSTREAM_OUTBOX__URL": DB,
        "JOBSTREAM_OUTBOX__TABLE": names.outbox,
        "JOBSTREAM_OUTBOX__POLL_S": "0.05",
        "JOBSTREAM_OUTBOX__STANDBY_POLL_S": "0.2",
        "JOBSTREAM_OUTBOX_EFFECTS": names.effects,
        "JOBSTREAM_OUTBOX_CHAOS_RUN": names.run,
    }
    if broker == "kafka":
        env["JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS"] = address
    else:
        env["JOBSTREAM_NATS__SERVERS"] = json.dumps([address])
    return env


class Processes:
    """Replicas of one command, each replaced at once when killed (as Kubernetes would)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port_var: str, logs: Path):
        self.name, self.argv, self.env, self.port_var, self.logs = name, argv, env, port_var, logs
        self.running: list[tuple[subprocess.Popen[bytes], int]] = []
        self.killed: set[int] = set()
        self.exits: list[int] = []
        self.started = 0

    def start(self) -> None:
        port = free_port()
        with (self.logs / f"{self.name}-{self.started}.log").open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "jobstream", *self.argv],
                env={**self.env, self.port_var: str(port)},
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
                raise SystemExit(f"{self.name} not ready after 90 s; see {self.logs}")
            await asyncio.sleep(0.2)

    def kill(self, pid: int | None = None, turn: int = 0) -> int:
        index = next(
            (i for i, (p, _) in enumerate(self.running) if p.pid == pid), turn % len(self.running)
        )
        process, _ = self.running.pop(index)
        process.send_signal(signal.SIGKILL)
        process.wait()
        self.killed.add(process.pid)
        self.start()
        return process.pid

    def restart_exited(self) -> None:
        for entry in [e for e in self.running if e[0].poll() is not None]:
            self.running.remove(entry)
            self.exits.append(entry[0].returncode)
            self.start()

    def stop(self) -> list[int]:
        for process, _ in self.running:
            process.send_signal(signal.SIGTERM)
        return [process.wait(timeout=90) for process, _ in self.running]

    def kill_left(self) -> None:
        """After a failed run: SIGKILL whatever still runs (nothing after `stop`)."""
        for process, _ in self.running:
            if process.poll() is None:
                process.kill()
                process.wait()


def add(index: int, jobs: int, rate: float, work_ms: int | None = None) -> None:
    """One adder process: `jobs` jobs in transactions of 1 to 4, at about `rate` per second,
    every tenth transaction rolled back. Each job works `work_ms` inside its transaction
    (default: 20 to 79 ms)."""
    names = Names(os.environ["JOBSTREAM_OUTBOX_CHAOS_RUN"])
    outbox = Outbox(ProducerSettings(), table=names.outbox)
    insert_order = sql.SQL("INSERT INTO {} (job_id) VALUES (%s)").format(
        sql.Identifier(names.orders)
    )
    note_rolled = sql.SQL("INSERT INTO {} (job_id) VALUES (%s)").format(
        sql.Identifier(names.rolled)
    )
    chooser = random.Random(index)
    started = time.monotonic()
    seq, transactions = 0, 0
    with psycopg.connect(DB, autocommit=True) as conn:
        while seq < jobs:
            size = min(chooser.randint(1, 4), jobs - seq)
            transactions += 1
            roll_back = transactions % 10 == 0
            ids: list[str] = []
            with contextlib.suppress(psycopg.Rollback), conn.transaction():
                for _ in range(size):
                    job = OutboxEffect(
                        seq=index * 1_000_000 + seq, work_ms=work_ms or 20 + seq % 60
                    )
                    key = f"a{index}-k{seq % KEYS_PER_ADDER}"
                    job_id = outbox.add_sync(conn, job, key=key)
                    conn.execute(insert_order, (job_id,))
                    ids.append(job_id)
                    seq += 1
                if roll_back:
                    raise psycopg.Rollback
            if roll_back:
                for job_id in ids:
                    conn.execute(note_rolled, (job_id,))
            ahead_s = seq / rate - (time.monotonic() - started)
            if ahead_s > 0:
                time.sleep(ahead_s)


def services(env: dict[str, str], action: str, broker: str) -> None:
    """`scripts/services.py up|down <broker>` on this run's private ports."""
    command = [sys.executable, "scripts/services.py", action, broker]
    subprocess.run(command, env=env, cwd=ROOT, check=action == "up", stdout=subprocess.DEVNULL)


def jobstream(env: dict[str, str], *args: str) -> None:
    command = [sys.executable, "-m", "jobstream", *args]
    subprocess.run(command, env=env, cwd=ROOT, check=True, capture_output=True, timeout=120)


def adder(
    env: dict[str, str], index: int, jobs: int, rate: float, work_ms: int
) -> subprocess.Popen[bytes]:
    args = [str(index), str(jobs), str(rate), str(work_ms)]
    command = [sys.executable, "-m", "tests.chaos_outbox", "add", *args]
    return subprocess.Popen(command, env=env, cwd=ROOT)


async def count(conn: psycopg.AsyncConnection, query: sql.Composable) -> int:
    row = await (await conn.execute(query)).fetchone()
    return int(row[0]) if row else 0


async def leader_pid(conn: psycopg.AsyncConnection) -> int | None:
    """The pid of the relay process holding the outbox lock (from its application_name)."""
    row = await (
        await conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s"
            " AND a.application_name LIKE 'jobstream-outbox-relay:%%'",
            (0x6A6F62,),
        )
    ).fetchone()
    return int(str(row[0]).rsplit(":", 1)[1]) if row else None


async def outbox_chaos(
    broker: str,
    *,
    jobs: int,
    adders: int = 4,
    relays: int = 2,
    relay_kills: int = 10,
    workers: int = 3,
    worker_kills: int = 0,
    rate: float = 400.0,
    work_ms: int = 0,
    private: bool = False,
) -> Result:
    names = Names(uuid.uuid4().hex[:8])
    home = RUN / f"{broker}-{names.run}"
    home.mkdir(parents=True, exist_ok=True)
    services_env = {
        **os.environ,
        "JOBSTREAM_LOCAL_RUN_DIR": str(home / "services"),
        "JOBSTREAM_LOCAL_KAFKA_PORT": PRIVATE_PORTS["kafka"],
        "JOBSTREAM_LOCAL_NATS_PORT": PRIVATE_PORTS["nats"],
    }
    if private:
        services(services_env, "up", broker)
        address = (
            f"127.0.0.1:{PRIVATE_PORTS['kafka']}"
            if broker == "kafka"
            else f"nats://127.0.0.1:{PRIVATE_PORTS['nats']}"
        )
    else:
        address = SHARED[broker]
    env = environment(broker, names, address)
    starts = home / "starts"
    starts.mkdir(exist_ok=True)
    env["JOBSTREAM_OUTBOX_STARTS"] = str(starts)
    result = Result(broker, jobs, adders, relays, workers)
    ident = sql.Identifier
    groups: list[Processes] = []
    adding: list[subprocess.Popen[bytes]] = []
    try:
        async with await psycopg.AsyncConnection.connect(DB, autocommit=True) as conn:
            await conn.execute(effects_ddl(names.effects))
            for table in (names.orders, names.rolled):
                await conn.execute(
                    sql.SQL("CREATE TABLE {} (job_id text PRIMARY KEY)").format(ident(table))
                )
            jobstream(env, "topics", "ensure")
            relay_group = Processes(
                "relay", ["outbox", "relay"], env, "JOBSTREAM_OUTBOX__HEALTH_PORT", home
            )
            worker_group = Processes(
                "worker", ["worker", "tests.apps.outbox:app"], env, "JOBSTREAM_HEALTH__PORT", home
            )
            groups += [relay_group, worker_group]
            for _ in range(workers):
                worker_group.start()
            await worker_group.ready()
            for _ in range(relays):
                relay_group.start()
            await relay_group.ready()
            started = time.monotonic()
            share = [jobs // adders + (1 if i < jobs % adders else 0) for i in range(adders)]
            adding = [adder(env, i, n, rate / adders, work_ms) for i, n in enumerate(share)]
            add_s = jobs / rate
            relay_events = [started + add_s * (n + 0.5) / relay_kills for n in range(relay_kills)]
            worker_events = [0.05 + 0.85 * n / worker_kills for n in range(worker_kills)]
            effects_query = sql.SQL("SELECT count(DISTINCT job_id) FROM {}").format(
                ident(names.effects)
            )
            orders_query = sql.SQL("SELECT count(*) FROM {}").format(ident(names.orders))
            turn = 0
            while True:
                relay_group.restart_exited()
                worker_group.restart_exited()
                adders_done = all(p.poll() is not None for p in adding)
                if adders_done and not result.add_seconds:
                    result.add_seconds = round(time.monotonic() - started, 1)
                    if any(p.returncode for p in adding):
                        raise SystemExit(f"an adder failed: {[p.returncode for p in adding]}")
                done = await count(conn, effects_query)
                if adders_done and done >= await count(conn, orders_query):
                    break
                if time.monotonic() - started > DEADLINE_S:
                    break
                if relay_events and time.monotonic() >= relay_events[0]:
                    relay_events.pop(0)
                    relay_group.kill(await leader_pid(conn), turn)
                    turn += 1
                if worker_events and done >= worker_events[0] * jobs * 0.9:
                    worker_events.pop(0)
                    worker_group.kill(turn=turn)
                    turn += 1
                await asyncio.sleep(0.1)
            result.seconds = round(time.monotonic() - started, 1)
            # A replica replaced just now may still be starting: a SIGTERM before it
            # handles signals would end it as a kill, not as the shutdown under test.
            await relay_group.ready()
            await worker_group.ready()
            result.relay_exits = relay_group.exits + relay_group.stop()
            result.worker_exits = worker_group.exits + worker_group.stop()
            result.relay_kills = len(relay_group.killed)
            result.worker_kills = len(worker_group.killed)
            await tally(conn, names, result)
            result.interrupted = await interrupted(conn, names, starts, worker_group.killed)
            seqs = await published_seqs(broker, address, names)
            result.published = len(seqs)
            result.published_out_of_order = out_of_order(seqs)
    finally:
        for group in groups:
            group.kill_left()
        for process in adding:
            if process.poll() is None:
                process.kill()
        if private:
            services(services_env, "down", broker)
        with contextlib.suppress(Exception):
            await drop(names)
        if not private:
            with contextlib.suppress(Exception):
                await remove_destinations(broker, address, names)
    return result


async def tally(conn: psycopg.AsyncConnection, names: Names, result: Result) -> None:
    ident = sql.Identifier
    committed = {
        str(r[0])
        for r in await (
            await conn.execute(sql.SQL("SELECT job_id FROM {}").format(ident(names.orders)))
        ).fetchall()
    }
    rolled = {
        str(r[0])
        for r in await (
            await conn.execute(sql.SQL("SELECT job_id FROM {}").format(ident(names.rolled)))
        ).fetchall()
    }
    rows = await (
        await conn.execute(
            sql.SQL("SELECT job_id, key, seq FROM {} ORDER BY at").format(ident(names.effects))
        )
    ).fetchall()
    runs: dict[str, int] = {}
    last: dict[str, int] = {}
    out_of_order: set[str] = set()
    for job_id, key, seq in rows:
        runs[job_id] = runs.get(job_id, 0) + 1
        if seq < last.get(key, -1):
            out_of_order.add(key)
        last[key] = max(seq, last.get(key, -1))
    result.committed, result.rolled_back = len(committed), len(rolled)
    result.effects = len(rows)
    result.lost = len(committed - runs.keys())
    result.duplicated = sum(1 for n in runs.values() if n > 1)
    result.phantom = len(runs.keys() & rolled) + len(runs.keys() - committed - rolled)
    result.keys_out_of_order = len(out_of_order)
    result.keys = len(last)


async def interrupted(
    conn: psycopg.AsyncConnection, names: Names, starts: Path, killed: set[int]
) -> int:
    """Runs that killed workers began (their start files) without an effect of theirs."""
    query = sql.SQL("SELECT job_id, pid FROM {}").format(sql.Identifier(names.effects))
    landed = {(str(r[0]), int(r[1])) for r in await (await conn.execute(query)).fetchall()}
    return len(started_by(starts, killed) - landed)


def started_by(starts: Path, pids: set[int]) -> set[tuple[str, int]]:
    """(job id, pid) of every run the processes `pids` began."""
    return {
        (job_id, int(path.name))
        for path in starts.iterdir()
        if int(path.name) in pids
        for job_id in path.read_text().split()
    }


def key_of(seq: int) -> str:
    """The key the adder gave the job with this `seq` (see `add`)."""
    return f"a{seq // 1_000_000}-k{seq % 1_000_000 % KEYS_PER_ADDER}"


def out_of_order(seqs: list[int]) -> int:
    """Keys whose first copies in `seqs` (broker order per partition) do not rise."""
    seen: set[int] = set()
    last: dict[str, int] = {}
    bad: set[str] = set()
    for seq in seqs:
        if seq in seen:
            continue  # a re-published copy: its first copy holds its place
        seen.add(seq)
        key = key_of(seq)
        if seq < last.get(key, -1):
            bad.add(key)
        last[key] = seq
    return len(bad)


async def published_seqs(broker: str, address: str, names: Names) -> list[int]:
    """The `seq` of every record of the run on the broker: in stream order (NATS), or
    partition by partition in offset order (Kafka; a key lives in one partition)."""
    if broker == "nats":
        client = await nats.connect(address)
        try:
            js = client.jetstream()
            # No acks: a consumer that needs them stops at its max_ack_pending (1,000).
            unacked = ConsumerConfig(ack_policy=AckPolicy.NONE)
            subscription = await js.pull_subscribe(
                f"ob{names.run}.>", stream=f"OB_{names.run}", config=unacked
            )
            found: list[int] = []
            while True:
                try:
                    batch = await subscription.fetch(1000, timeout=2)
                except nats.errors.TimeoutError:
                    return found
                found += [json.loads(message.data)["seq"] for message in batch]
        finally:
            await client.close()
    topic = f"ob-{names.run}.outbox.effect"
    admin = AIOKafkaAdminClient(bootstrap_servers=address)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions = [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=address, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        by_partition: dict[int, list[int]] = {p.partition: [] for p in partitions}
        while [p for p in partitions if await consumer.position(p) < ends[p]]:
            fetched = await consumer.getmany(timeout_ms=1000)
            for tp, records in fetched.items():
                by_partition[tp.partition] += [json.loads(r.value)["seq"] for r in records]
        return [seq for part in by_partition.values() for seq in part]
    finally:
        try:
            await consumer.stop()
        except asyncio.CancelledError:
            # aiokafka cancels its own committed-offset task at stop and re-raises that
            # cancellation; only one aimed at this task must go on.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise


async def remove_destinations(broker: str, address: str, names: Names) -> None:
    """The run's topics (Kafka) or stream (NATS) on the shared broker."""
    if broker == "nats":
        client = await nats.connect(address)
        try:
            await client.jetstream().delete_stream(f"OB_{names.run}")
        finally:
            await client.close()
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=address)
    await admin.start()
    try:
        topics = [t for t in await admin.list_topics() if t.startswith(f"ob-{names.run}.")]
        if topics:
            await admin.delete_topics(topics)
    finally:
        await admin.close()


async def drop(names: Names) -> None:
    async with await psycopg.AsyncConnection.connect(DB, autocommit=True) as conn:
        for table in (
            names.outbox,
            names.orders,
            names.rolled,
            names.effects,
            f"{names.namespace}_idempotency",
        ):
            await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "add":
        add(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]) or None)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=["kafka", "nats", "both"], default="both")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--adders", type=int, default=4)
    parser.add_argument("--relays", type=int, default=2)
    parser.add_argument("--relay-kills", type=int, default=10)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--worker-kills", type=int, default=0)
    parser.add_argument(
        "--rate", type=float, default=400.0, help="jobs added per second, all adders"
    )
    parser.add_argument(
        "--private", action="store_true", help="a broker of its own (ports 19692/14822)"
    )
    args = parser.parse_args()
    brokers = ["kafka", "nats"] if args.broker == "both" else [args.broker]
    failed = False
    RUN.mkdir(parents=True, exist_ok=True)
    for broker in brokers:
        result = asyncio.run(
            outbox_chaos(
                broker,
                jobs=args.jobs,
                adders=args.adders,
                relays=args.relays,
                relay_kills=args.relay_kills,
                workers=args.workers,
                worker_kills=args.worker_kills,
                rate=args.rate,
                private=args.private,
            )
        )
        report = {**asdict(result), "ok": result.ok}
        (RUN / f"{broker}.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report))
        failed |= not result.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
