"""Brokers of a test's own, for tests that stop, pause or break them: never the shared
services that `make up` started (other tests use those at the same time).

`PrivateKafka` runs `scripts/services.py` with its own run folder and ports (Kafka on
`JOBSTREAM_TEST_PRIVATE_KAFKA_PORT`, default 19292, its controller on the next port). It
takes several seconds to start: a module-scoped fixture should own one
(`private_kafka_for_module`). A NATS server of a test's own is `OwnServer`: a
`nats-server` with JetStream on a free port and its own store, started in well under a
second, so a test can own one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nats
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas import Job, encode, to_kafka
from tests.support import ROOT, free_port

PRIVATE_KAFKA_PORT = int(os.environ.get("JOBSTREAM_TEST_PRIVATE_KAFKA_PORT", "19292"))


class PrivateKafka:
    """A single-node Kafka (KRaft) in `run_dir`, started and stopped by the service script."""

    def __init__(self, run_dir: Path, port: int = PRIVATE_KAFKA_PORT) -> None:
        self.run_dir = run_dir
        self.port = port
        self.bootstrap = f"127.0.0.1:{port}"

    def _services(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "JOBSTREAM_LOCAL_RUN_DIR": str(self.run_dir),
            "JOBSTREAM_LOCAL_KAFKA_PORT": str(self.port),
            # Never the shared NATS port, should the script ever touch NATS.
            "JOBSTREAM_LOCAL_NATS_PORT": str(self.port + 2),
        }
        return subprocess.run(
            [sys.executable, str(ROOT / "scripts/services.py"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    def up(self) -> None:
        started = self._services("up", "kafka")
        if started.returncode != 0:
            msg = f"private Kafka on port {self.port} did not start: {started.stderr.strip()}"
            raise RuntimeError(msg)

    def down(self) -> None:
        self.resume()  # a stopped process cannot handle its SIGTERM
        self._services("down", "kafka")

    @property
    def pid(self) -> int:
        return int((self.run_dir / "kafka" / "pid").read_text().strip())

    def pause(self) -> None:
        """SIGSTOP the broker: connections stay open, nothing answers (a hung broker)."""
        os.killpg(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            os.killpg(self.pid, signal.SIGCONT)

    async def create_topics(self, names: list[str], partitions: int = 1) -> None:
        admin = self._admin()
        await admin.start()
        try:
            topics = [
                NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names
            ]
            await admin.create_topics(topics)
        finally:
            await admin.close()

    async def committed(self, group: str, topic: str, partition: int = 0) -> int | None:
        """The offset `group` committed on `topic[partition]`, or None."""
        admin = self._admin()
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(group)
        finally:
            await admin.close()
        found = offsets.get(TopicPartition(topic, partition))
        return found.offset if found is not None else None

    async def publish(self, topic: str, jobs: list[tuple[str | None, Job]]) -> list[str]:
        """Publish with a plain aiokafka producer (the wire contract); the job ids."""
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
        await producer.start()
        ids = []
        try:
            for key, job in jobs:
                message = encode(job, source="/tests", key=key)
                record_key, headers = to_kafka(message.attributes)
                await producer.send_and_wait(topic, message.body, key=record_key, headers=headers)
                ids.append(message.attributes.id)
        finally:
            await producer.stop()
        return ids

    def _admin(self) -> AIOKafkaAdminClient:
        return AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=20_000)


@contextlib.contextmanager
def private_kafka_for_module(run_dir: Path) -> Iterator[PrivateKafka]:
    """A private Kafka for the life of a block (a module-scoped fixture's body)."""
    kafka = PrivateKafka(run_dir)
    try:
        kafka.up()
        yield kafka
    finally:
        kafka.down()


class OwnServer:
    """A nats-server with JetStream on its own port and store, for tests that stop it."""

    def __init__(self, store: Path) -> None:
        self.port = free_port()
        self.store = store
        self.url = f"nats://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        binary = Path(sys.executable).parent / "nats-server"
        address = ["-a", "127.0.0.1", "-p", str(self.port)]
        command = [str(binary), *address, "-js", "-sd", str(self.store)]
        with (self.store.parent / "nats-server.log").open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    async def start(self) -> None:
        self.launch()
        for _ in range(100):
            with contextlib.suppress(Exception):
                client = await nats.connect(
                    self.url, connect_timeout=1, max_reconnect_attempts=0, error_cb=_quiet
                )
                try:
                    await client.jetstream().account_info()
                    return
                finally:
                    await client.close()
            await asyncio.sleep(0.1)  # the server is starting
        raise AssertionError(f"nats-server on port {self.port} did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if sig != signal.SIGKILL:
            self.resume()  # a stopped process cannot handle its signal (SIGKILL needs none)
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(30)
        self.process = None

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open, nothing answers (a hung server)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)


async def _quiet(error: Exception) -> None:
    """Connection attempts to a server that is still starting fail: expected."""
