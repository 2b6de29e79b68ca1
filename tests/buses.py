"""The contract suite's view of a backend: a `Bus` per transport (Kafka, NATS, memory).

A bus hides only what differs between the backends: how jobs reach the broker (its plain
client, i.e. the wire contract), how workers start, die and stop, how dead letters are
read and replayed, and how "every job is settled" is observed. Kafka and NATS workers are
`jobstream worker` processes, killed and stopped with real signals; memory workers run in
the test's process over `consumer.memory.BACKEND`'s broker (`TestApp`), crash without a
drain or a commit, and are told apart in the sink by `tests.apps.recorder.WORKER_ID`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from consumer import Settings
from consumer.core import DeadLetterFilter, DeadLetterRecord, Features
from consumer.memory import BACKEND as MEMORY
from consumer.memory import TestApp
from jobstream._dlq import full
from schemas import Job, encode, to_kafka
from tests.apps.recorder import WORKER_ID, app
from tests.support import ROOT, start_ready_workers, stop_worker, worker_env

FAST_RETRIES = {"max_attempts": 3, "initial_delay_s": 0.5, "multiplier": 2.0, "jitter": 0.0}


class WorkerHandle(Protocol):
    """One worker of a test: a process, or an in-process worker on the memory backend."""

    @property
    def pid(self) -> int:
        """What the recorder writes in the sink's `pid` field for this worker's runs."""
        ...

    async def kill(self) -> None:
        """SIGKILL, or its in-process equivalent: no drain, no commit."""
        ...

    async def stop(self) -> int:
        """SIGTERM, or `Worker.stop()`: drain, commit, leave; the exit code."""
        ...


@dataclass
class ProcessWorker:
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    async def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.process.wait, 10)

    async def stop(self) -> int:
        return await asyncio.to_thread(stop_worker, self.process)


@dataclass
class InProcessWorker:
    harness: TestApp
    index: int
    pid: int

    async def kill(self) -> None:
        await self.harness.crash(self.index)

    async def stop(self) -> int:
        try:
            await self.harness.stop_worker(self.index)
        except Exception:
            return 1
        return 0


@dataclass
class Bus:
    """One transport, one test: a fresh destination for `test.record` and a fresh group."""

    transport: str
    features: Features
    destination: str  # Kafka topic / NATS subject / memory topic of test.record
    group: str
    first_offset: int  # of a fresh destination: Kafka and memory 0, JetStream 1
    publish: Callable[..., Awaitable[list[str]]]
    publish_record: Callable[[dict[str, str], bytes], Awaitable[None]]
    dead_letters: Callable[[], Awaitable[list[DeadLetterRecord]]]
    settled: Callable[[], Awaitable[bool]]
    start_workers: Callable[[dict[str, str], Path, int], Awaitable[list[WorkerHandle]]]
    dlq: Callable[..., Awaitable[str]]
    """`dlq(env, "list", "--json")`: what `jobstream dlq ...` prints with `env` (memory: the
    same commands answered in process, since its broker lives here)."""
    env_extra: dict[str, str]
    settings_extra: dict[str, Any]
    store: dict[str, str] = field(default_factory=dict)

    def env(self, sink: Path, **extra: str) -> dict[str, str]:
        """Environment of a worker of this bus."""
        return worker_env(self.destination, self.group, sink, **self.env_extra, **extra)

    def shared_store(self, lease_s: float) -> dict[str, str]:
        """A store every worker of the group shares: Redis (Kafka), NATS KV (NATS), the
        harness's one memory store (memory)."""
        namespace = f"t{uuid.uuid4().hex[:8]}"
        self.store["namespace"] = namespace
        env = {
            "JOBSTREAM_IDEMPOTENCY__NAMESPACE": namespace,
            "JOBSTREAM_IDEMPOTENCY__LEASE_S": str(lease_s),
        }
        if self.transport == "kafka":
            from tests.conftest import REDIS_URL

            return env | {
                "JOBSTREAM_IDEMPOTENCY__BACKEND": "redis",
                "JOBSTREAM_IDEMPOTENCY__URL": REDIS_URL,
            }
        if self.transport == "nats":
            return env | {"JOBSTREAM_IDEMPOTENCY__BACKEND": "nats-kv"}
        return env

    def settings(self, *, worker: dict[str, Any] | None = None, **sections: Any) -> Settings:
        """In-process worker settings: fast retries, this bus's destination and group."""
        return Settings.model_validate(
            {
                "retry": {"tiers_s": [0.5, 2.0], "policy": FAST_RETRIES},
                **self.settings_extra,
                "worker": {"group": self.group, "commit_interval_s": 0.2, **(worker or {})},
                **sections,
            }
        )

    async def dlq_json(self, env: dict[str, str], *args: str) -> list[dict[str, str]]:
        """A `dlq` command that prints one JSON object per line."""
        return [json.loads(line) for line in (await self.dlq(env, *args)).splitlines()]

    async def wait_for_dead_letters(self, count: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while len(await self.dead_letters()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {count} dead letters")
            await asyncio.sleep(0.2)

    async def wait_settled(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not await self.settled():
            if time.monotonic() > deadline:
                raise AssertionError("the group did not settle every job")
            await asyncio.sleep(0.2)


async def process_workers(env: dict[str, str], logs: Path, count: int) -> list[WorkerHandle]:
    """`count` `jobstream worker` processes, each joined to the group (/readyz)."""
    return [ProcessWorker(p) for p in await start_ready_workers(env, logs, count)]


async def cli_dlq(env: dict[str, str], *args: str) -> str:
    """`jobstream dlq ...` as a process with `env`; what it printed (exit 0 asserted)."""
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "jobstream", "dlq", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


# -- memory ------------------------------------------------------------------------------------

_WORKER_IDS = itertools.count(1_000_001)  # never a real pid in a sink of this run


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@dataclass
class MemoryBus:
    """What a memory `Bus` needs beyond its topic: the harness its workers run in."""

    topic: str
    group: str
    partitions: int
    harness: TestApp | None = None
    dead_letter_topic: str = ""

    def __post_init__(self) -> None:
        self.dead_letter_topic = f"{self.topic}.dlq"
        for name in (self.topic, f"{self.topic}.retry.1", f"{self.topic}.retry.2"):
            MEMORY.broker.create_topic(name, self.partitions)
        MEMORY.broker.create_topic(self.dead_letter_topic, self.partitions)

    async def publish(
        self, jobs: list[tuple[str | None, Job]], *, ids: list[str] | None = None
    ) -> list[str]:
        published = []
        for index, (key, job) in enumerate(jobs):
            message = encode(job, source="/tests", key=key, id=ids[index] if ids else None)
            record_key, headers = to_kafka(message.attributes)
            await MEMORY.broker.append(self.topic, record_key, headers, message.body)
            published.append(message.attributes.id)
        return published

    async def publish_record(self, headers: dict[str, str], body: bytes) -> None:
        pairs = [(_kafka_name(k), v.encode()) for k, v in headers.items()]
        await MEMORY.broker.append(self.topic, None, pairs, body)

    async def dead_letters(self, settings: Settings) -> list[DeadLetterRecord]:
        where = DeadLetterFilter()
        return await MEMORY.find_dead_letters(settings, [self.dead_letter_topic], where)

    async def settled(self) -> bool:
        broker = MEMORY.broker
        for topic in (self.topic, f"{self.topic}.retry.1", f"{self.topic}.retry.2"):
            for partition in range(broker.partitions(topic)):
                end = broker.end_offset(topic, partition)
                if end and (broker.committed(self.group, topic, partition) or 0) < end:
                    return False
        return True

    async def start_workers(self, env: dict[str, str], logs: Path, count: int) -> list[Any]:
        os.environ.update({k: v for k, v in env.items() if k.startswith("JOBSTREAM_TEST_")})
        if self.harness is None:
            with _environ(env):
                settings = Settings()
            self.harness = TestApp(app, settings, workers=0, broker=MEMORY.broker)
            await self.harness.__aenter__()
        handles: list[Any] = []
        for _ in range(count):
            handles.append(await asyncio.create_task(self._start_one()))
        return handles

    async def _start_one(self) -> InProcessWorker:
        # The worker's tasks are created below, so they inherit this task's WORKER_ID.
        assert self.harness is not None
        worker_id = next(_WORKER_IDS)
        WORKER_ID.set(worker_id)
        await self.harness.add_worker()
        return InProcessWorker(self.harness, len(self.harness.workers) - 1, worker_id)

    async def dlq(self, settings: Settings, *args: str) -> str:
        """`dlq list --json`, `dlq show ID`, `dlq replay --type T [--dry-run]`, in process."""
        command, rest = args[0], list(args[1:])
        records = await self.dead_letters(settings)
        if command == "list":
            return "".join(json.dumps(r.summary()) + "\n" for r in records)
        if command == "show":
            wanted = rest[0]
            found = [r for r in records if wanted in (r.id, r.job_id)]
            return "".join(json.dumps(full(r), indent=2) + "\n" for r in found)
        assert command == "replay", command
        job_type = rest[rest.index("--type") + 1]
        chosen = [r for r in records if r.job_type == job_type]
        results = await MEMORY.replay(
            settings, chosen, dry_run="--dry-run" in rest, force="--force" in rest
        )
        lines = [{"id": r.record.id, "status": r.status, "to": r.destination} for r in results]
        return "".join(json.dumps(line) + "\n" for line in lines)

    async def close(self) -> None:
        if self.harness is not None:
            await self.harness.__aexit__(None, None, None)


def _kafka_name(name: str) -> str:
    return "ce_" + name[3:] if name.startswith("ce-") else name


def nats_name(name: str) -> str:
    return "ce-" + name[3:] if name.startswith("ce_") else name


def memory_bus(topic: str, group: str, partitions: int) -> tuple[Bus, MemoryBus]:
    """A bus on `consumer.memory.BACKEND`'s broker, and the state to close after the test."""
    state = MemoryBus(topic, group, partitions)
    routing = {"routes": {"test.record": topic}}
    bus: Bus

    async def dead_letters() -> list[DeadLetterRecord]:
        return await state.dead_letters(bus.settings())

    async def dlq(env: dict[str, str], *args: str) -> str:
        return await state.dlq(bus.settings(), *args)

    bus = Bus(
        "memory",
        MEMORY.features,
        topic,
        group,
        0,
        state.publish,
        state.publish_record,
        dead_letters,
        state.settled,
        state.start_workers,
        dlq,
        env_extra={
            "JOBSTREAM_TRANSPORT": "memory",
            "JOBSTREAM_RETRY__TIERS_S": "[0.5, 2.0]",
            "JOBSTREAM_WORKER__REVOKE_TIMEOUT_S": "4",
        },
        settings_extra={"transport": "memory", "routing": routing},
    )
    return bus, state
