"""Publish throughput: `JobProducer.publish_many` against the raw clients, Kafka and NATS.

    .venv/bin/python bench/bench_publish.py [--n 20000] [--repeats 3]

Per repeat, each contestant publishes N small jobs to a fresh topic / stream
(`bench-<uuid>`, deleted afterwards) and the clock runs from the first send until the last
acknowledgement (clients are connected before the clock starts):

- raw kafka: one `AIOKafkaProducer(acks="all", enable_idempotence=True)` with jobstream's
  linger and batch size; `send()` every record, then await every delivery future. Records
  are built before the clock starts (the same value and CloudEvents headers each time).
- jobstream kafka: `JobProducer.publish_many(jobs)`, which also encodes every job
  (id, time, headers, JSON body) inside the timed window.
- raw nats: JetStream `publish_async` with at most 1000 in flight (nats-py's semaphore),
  then await every PubAck; headers prebuilt (a distinct `Nats-Msg-Id` per message).
- jobstream nats: `JobProducer.publish_many(jobs)` with `max_in_flight=1000`.

Prints the median jobs/s of each contestant, the CPU time of this process per job over the
same window (`time.process_time()`: the client and, for jobstream, the encoding; the
brokers' CPU is not in it) and the ratio jobstream / raw, then the CPU cost per job of the
wire encoding alone (`schemas.encode` + `to_kafka` / `to_nats`, no broker), which jobstream
pays and the raw loops do not, and the ratio with it subtracted (what the transport layer
costs compared with the raw client). Every jobstream run checks N receipts with N distinct
job ids. The load average is printed with the figures: the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import nats
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from nats.js.api import StorageType, StreamConfig

from producer import JobProducer, KafkaSettings, NatsSettings, ProducerSettings, RoutingSettings
from schemas import encode, to_kafka, to_nats
from schemas.examples import GenerateReport

PARTITIONS = 4
IN_FLIGHT = 1000
KAFKA = KafkaSettings()
NATS = NatsSettings(max_in_flight=IN_FLIGHT)


class Run(NamedTuple):
    """One contestant's timed window: wall-clock and CPU seconds of this process."""

    wall: float
    cpu: float


def clock() -> Run:
    return Run(time.perf_counter(), time.process_time())


def since(start: Run) -> Run:
    return Run(time.perf_counter() - start.wall, time.process_time() - start.cpu)


def jobs(n: int) -> list[GenerateReport]:
    return [GenerateReport(account_id=f"acct-{i:06d}", month="2025-01") for i in range(n)]


async def raw_kafka(topic: str, n: int) -> Run:
    key, headers = to_kafka(encode(jobs(1)[0], source="/bench").attributes)
    value = jobs(1)[0].model_dump_json().encode()
    producer = AIOKafkaProducer(
        bootstrap_servers=KAFKA.bootstrap_servers,
        acks="all",
        enable_idempotence=True,
        linger_ms=KAFKA.linger_ms,
        max_batch_size=KAFKA.max_batch_bytes,
    )
    await producer.start()
    try:
        await producer.partitions_for(topic)  # metadata before the clock, as ours does
        started = clock()
        futures = [await producer.send(topic, value, key=key, headers=headers) for _ in range(n)]
        await asyncio.gather(*futures)
        return since(started)
    finally:
        await producer.stop()


async def ours(settings: ProducerSettings, n: int) -> Run:
    batch = jobs(n)
    async with JobProducer(settings) as producer:
        await producer.publish(batch[0])  # connection and metadata before the clock
        started = clock()
        receipts = await producer.publish_many(batch)
        elapsed = since(started)
    assert len(receipts) == n
    assert len({receipt.job_id for receipt in receipts}) == n, "duplicate job ids"
    assert not any(receipt.duplicate for receipt in receipts)
    return elapsed


async def raw_nats(subject: str, n: int) -> Run:
    message = encode(jobs(1)[0], source="/bench")
    value = message.body
    base = to_nats(message.attributes)
    headers = [{**base, "Nats-Msg-Id": f"raw-{i}"} for i in range(n)]
    client = await nats.connect(NATS.servers)
    try:
        js = client.jetstream(publish_async_max_pending=IN_FLIGHT)
        await js.publish(subject, value, headers={**base, "Nats-Msg-Id": "warm-up"})
        started = clock()
        futures = [await js.publish_async(subject, value, headers=h) for h in headers]
        await asyncio.gather(*futures)
        return since(started)
    finally:
        await client.close()


async def with_topic(run: Callable[[str], Awaitable[Run]]) -> Run:
    topic = f"bench-{uuid.uuid4().hex[:12]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
        return await run(topic)
    finally:
        await admin.delete_topics([topic])
        await admin.close()


async def with_stream(run: Callable[[str, str], Awaitable[Run]]) -> Run:
    name = f"bench_{uuid.uuid4().hex[:12]}"
    client = await nats.connect(NATS.servers)
    js = client.jetstream()
    try:
        config = StreamConfig(name=name, subjects=[f"{name}.>"], storage=StorageType.FILE)
        await js.add_stream(config)
        return await run(name, name)
    finally:
        await js.delete_stream(name)
        await client.close()


def kafka_settings(topic: str) -> ProducerSettings:
    routing = RoutingSettings(routes={GenerateReport.job_type: topic})
    return ProducerSettings(transport="kafka", source="/bench", kafka=KAFKA, routing=routing)


def nats_settings(stream: str, prefix: str) -> ProducerSettings:
    routing = RoutingSettings(subject_prefix=f"{prefix}.", stream=stream)
    return ProducerSettings(transport="nats", source="/bench", nats=NATS, routing=routing)


async def main(n: int, repeats: int) -> None:
    contestants: dict[str, Callable[[], Awaitable[Run]]] = {
        "raw kafka": lambda: with_topic(lambda t: raw_kafka(t, n)),
        "jobstream kafka": lambda: with_topic(lambda t: ours(kafka_settings(t), n)),
        "raw nats": lambda: with_stream(lambda s, p: raw_nats(f"{p}.{GenerateReport.job_type}", n)),
        "jobstream nats": lambda: with_stream(lambda s, p: ours(nats_settings(s, p), n)),
    }
    sample = encode(jobs(1)[0], source="/bench")
    _, headers = to_kafka(sample.attributes)
    header_bytes = sum(len(k) + len(v) for k, v in headers)
    print(
        f"N={n} jobs, {repeats} repeats (median); body {len(sample.body)} B, "
        f"kafka headers {header_bytes} B, {PARTITIONS} partitions / file stream R1; "
        f"load average {os.getloadavg()[0]:.2f} at the start"
    )
    runs: dict[str, list[Run]] = {name: [] for name in contestants}
    for _ in range(repeats):
        for name, run in contestants.items():  # interleaved, so drift hits all alike
            runs[name].append(await run())
    rates = {name: n / statistics.median(r.wall for r in values) for name, values in runs.items()}
    for name, rate in rates.items():
        cpu = statistics.median(r.cpu for r in runs[name]) / n * 1e6
        each = ", ".join(f"{n / r.wall:,.0f}" for r in runs[name])
        print(f"{name:16} {rate:>10,.0f} jobs/s {cpu:6.1f} CPU us/job   (runs: {each})")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    batch = jobs(n)
    for broker, to_headers in (("kafka", to_kafka), ("nats", to_nats)):
        ratio = rates[f"jobstream {broker}"] / rates[f"raw {broker}"]
        started = time.perf_counter()
        for job in batch:
            to_headers(encode(job, source="/bench").attributes)
        encoding = (time.perf_counter() - started) / n
        transport = 1 / rates[f"jobstream {broker}"] - encoding
        without = 1 / transport / rates[f"raw {broker}"]
        print(
            f"ratio jobstream/raw {broker}: {ratio:.0%}; "
            f"wire encoding {encoding * 1e6:.1f} us/job; without it {without:.0%}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="jobs per run (default 20000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per contestant (default 3)")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.n, arguments.repeats))
