"""The worker's `/metrics` endpoint after a known run on real Kafka.

10 jobs: 7 succeed at once, 2 fail once and succeed on their retry, 1 asks to be
dead-lettered. The Prometheus text then holds exactly: 12 attempts started, 9 succeeded,
3 failed, 2 retried, 1 dead-lettered; 12 processing durations; nothing in flight, no lag
and empty retry tiers once everything settled.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections import defaultdict

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.apps.recorder import RecordJob
from tests.support import (
    caught_up,
    free_port,
    publish_raw,
    read_sink,
    start_worker,
    stop_worker,
    wait_until,
    worker_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

JOB_TYPE = "test.record"


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name -> {sorted labels without the scope labels: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(
                sorted((k, v) for k, v in sample.labels.items() if not k.startswith("otel_scope"))
            )
            samples[sample.name][labels] = sample.value
    return samples


def total(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str) -> float:
    return sum(samples.get(name, {}).values())


async def test_metrics_endpoint_counts_a_known_run_exactly(
    new_topic, group_id, kafka_admin, tmp_path
) -> None:
    topic = await new_topic(partitions=2)
    for suffix in (".retry.1", ".retry.2", ".dlq"):
        await new_topic(partitions=2, name=topic + suffix)
    port = free_port()
    sink = tmp_path / "sink"
    env = worker_env(
        topic,
        group_id,
        sink,
        JOBSTREAM_HEALTH__PORT=str(port),
        JOBSTREAM_WORKER__COMMIT_INTERVAL_S="0.2",
        JOBSTREAM_RETRY__TIERS_S="[0.5, 2.0]",
        JOBSTREAM_RETRY__POLICY__INITIAL_DELAY_S="0.5",
        JOBSTREAM_RETRY__POLICY__JITTER="0",
    )
    for name in list(env):
        if name.startswith("OTEL_"):
            del env[name]  # the defaults: `/metrics` only, no OTLP export
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        behaviours = ["ok"] * 7 + ["fail-once"] * 2 + ["dead-letter"]
        jobs = [
            (f"k{i}", RecordJob(seq=i, key=f"k{i}", behaviour=b))  # type: ignore[arg-type]
            for i, b in enumerate(behaviours)
        ]
        await publish_raw(topic, jobs)
        await wait_until(lambda: len(read_sink(sink)) == 9, 60, "9 completed jobs")
        for _ in range(300):
            if await caught_up(kafka_admin, group_id, [topic, f"{topic}.retry.1"]):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the worker did not commit every offset within 30s")

        def lag_settled() -> bool:  # the backlog is re-read every 2 s
            lag = scrape(port).get("jobstream_consumer_lag", {})
            return len(lag) == 6 and sum(lag.values()) == 0

        await wait_until(lag_settled, 30, "the lag gauges to read 0")
        samples = scrape(port)
    finally:
        assert stop_worker(worker) == 0

    by_type = (("jobstream_job_type", JOB_TYPE),)
    assert samples["jobstream_jobs_started_total"] == {by_type: 12}
    assert samples["jobstream_jobs_succeeded_total"] == {by_type: 9}
    assert samples["jobstream_jobs_failed_total"] == {
        (("error_type", "Retry"), *by_type): 2,
        (("error_type", "DeadLetter"), *by_type): 1,
    }
    assert samples["jobstream_jobs_retried_total"] == {by_type: 2}
    assert samples["jobstream_jobs_dead_lettered_total"] == {
        (("jobstream_failure_reason", "dead-letter-requested"), *by_type): 1
    }
    assert "jobstream_jobs_skipped_total" not in samples
    assert total(samples, "messaging_process_duration_seconds_count") == 12
    durations: dict[tuple[str, str], float] = defaultdict(float)
    for labels, value in samples["messaging_process_duration_seconds_count"].items():
        found = dict(labels)
        durations[found["jobstream_job_outcome"], found["messaging_destination_name"]] += value
    assert durations == {
        ("completed", topic): 7,
        ("completed", f"{topic}.retry.1"): 2,
        ("retrying", topic): 2,
        ("dead_lettered", topic): 1,
    }
    assert samples["jobstream_worker_in_flight"] == {(): 0}
    lag = samples["jobstream_consumer_lag"]
    partitions = {
        (dict(k)["messaging_destination_name"], dict(k)["messaging_destination_partition_id"])
        for k in lag
    }
    assert partitions == {
        (t, p) for t in (topic, f"{topic}.retry.1", f"{topic}.retry.2") for p in ("0", "1")
    }
    assert set(lag.values()) == {0}
    depth = samples["jobstream_retry_depth"]
    assert {dict(k)["messaging_destination_name"]: v for k, v in depth.items()} == {
        f"{topic}.retry.1": 0,
        f"{topic}.retry.2": 0,
    }
