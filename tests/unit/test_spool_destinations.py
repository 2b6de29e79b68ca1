"""The spool keeps one FIFO per destination: a destination the broker refuses while it is
reachable (a missing topic) holds up only its own jobs, and a new job for it raises as
without a spool instead of getting a receipt for a job that cannot go."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from producer import DestinationMissing, JobProducer, read_spool_status
from producer.memory import MemoryBroker
from producer.retrying import set_testing
from schemas import Job, from_kafka
from tests.unit.test_spool import TOPIC, DownAtStart, Spooled, settings

OTHER = "jobs.test.elsewhere"


class Elsewhere(Job, type="test.elsewhere", version=1):
    """A job of another type: another destination."""

    n: int


@pytest.fixture(autouse=True)
def real_backoff() -> None:
    # The blocked destination is retried with short, real waits (testing mode would retry
    # it in a busy loop).
    set_testing(False)


def ids_in(broker: MemoryBroker, topic: str) -> list[str]:
    return [
        from_kafka(record.key, record.headers).id
        for partition in range(broker.partitions(topic))
        for record in broker.read(topic, partition, 0, max_records=10_000)
    ]


def producer_on(broker: MemoryBroker, path: Path) -> JobProducer:
    spool = {"retry_initial_s": 0.01, "retry_max_s": 0.05, "stop_drain_s": 0}
    return JobProducer(settings(path, **spool), publisher=DownAtStart(broker))


async def test_a_missing_destination_blocks_only_its_own_jobs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = MemoryBroker()
    broker.create_topic(OTHER, 1)  # TOPIC does not exist
    path = tmp_path / "spool.db"
    caplog.set_level(logging.INFO, "jobstream.producer")
    async with producer_on(broker, path) as producer:
        broker.faults.disconnect()
        stuck = await producer.publish(Spooled(key="a", n=0), key="a")
        waited = await producer.publish(Elsewhere(n=0))
        assert stuck.spooled and waited.spooled
        broker.faults.reconnect()
        # The other destination drains although the first job in the spool cannot go.
        assert await broker.wait_until(
            lambda: ids_in(broker, OTHER) == [waited.job_id], max_wait_s=5
        )
        async with asyncio.timeout(5):  # and its job has left the spool
            while read_spool_status(path).destinations != {TOPIC: 1}:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        # New jobs for other destinations are published directly, not spooled behind it.
        direct = await producer.publish(Elsewhere(n=1))
        assert not direct.spooled
        assert ids_in(broker, OTHER) == [waited.job_id, direct.job_id]
        # A new job for the missing destination raises, as without a spool.
        with pytest.raises(DestinationMissing, match="jobstream topics ensure") as caught:
            await producer.publish(Spooled(key="a", n=1), key="a", id="cannot-go")
        assert caught.value.job_id == "cannot-go"
        status = read_spool_status(path)
        assert (status.jobs, status.destinations) == (1, {TOPIC: 1})
        assert list(status.blocked) == [TOPIC]
        assert "does not exist" in status.blocked[TOPIC]
        [logged] = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert "`jobstream topics ensure`" in logged.getMessage()
        # `jobstream topics ensure`: the spooled job is published by the drainer's retry,
        # and the destination takes new jobs again, in order.
        broker.create_topic(TOPIC, 1)
        assert await broker.wait_until(
            lambda: ids_in(broker, TOPIC) == [stuck.job_id], max_wait_s=5
        )
        later = await producer.publish(Spooled(key="a", n=2), key="a")
        assert not later.spooled
        assert ids_in(broker, TOPIC) == [stuck.job_id, later.job_id]
        await asyncio.sleep(0.1)
        status = read_spool_status(path)
        assert (status.jobs, status.blocked) == (0, {})


async def test_a_new_job_for_a_blocked_destination_is_spooled_while_the_broker_is_away(
    tmp_path: Path,
) -> None:
    broker = MemoryBroker()
    path = tmp_path / "spool.db"
    async with producer_on(broker, path) as producer:
        broker.faults.disconnect()
        first = await producer.publish(Spooled(key="a", n=0), key="a")
        broker.faults.reconnect()
        async with asyncio.timeout(5):
            while not read_spool_status(path).blocked:  # noqa: ASYNC110 - a poll of a file
                await asyncio.sleep(0.01)
        broker.faults.disconnect()  # the broker is away: no telling, so it is spooled
        second = await producer.publish(Spooled(key="a", n=1), key="a")
        assert second.spooled
        broker.faults.reconnect()
        broker.create_topic(TOPIC, 1)
        assert await broker.wait_until(
            lambda: ids_in(broker, TOPIC) == [first.job_id, second.job_id], max_wait_s=5
        )


async def test_flush_publishes_every_other_destination_then_raises_for_the_blocked_one(
    tmp_path: Path,
) -> None:
    broker = MemoryBroker()
    broker.create_topic(OTHER, 1)
    path = tmp_path / "spool.db"
    broker.faults.disconnect()
    async with producer_on(broker, path) as producer:
        stuck = await producer.publish(Spooled(key="a", n=0), key="a")  # first in the spool
        waiting = [await producer.publish(Elsewhere(n=n)) for n in range(3)]
        broker.faults.reconnect()
        with pytest.raises(DestinationMissing):
            await producer.flush_spool()
        assert ids_in(broker, OTHER) == [r.job_id for r in waiting]
        status = await producer.spool_status()
        assert (status.destinations, list(status.blocked)) == ({TOPIC: 1}, [TOPIC])
    assert read_spool_status(path).jobs == 1  # kept for the next owner
    assert stuck.spooled
