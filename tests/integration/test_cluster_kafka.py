"""Kafka on a three-node KRaft cluster of the module's own (`scripts/cluster.py` on ports
29292-29297): `topics ensure` replicates, and 3 workers lose nothing while the broker that
leads most partitions, then the controller, is SIGKILLed and restarted under load
(`tests.cluster`: 20,000 jobs at 500 jobs/s, effects counted by job id in PostgreSQL).
Figures in docs/guarantees.md ("Clusters")."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from tests.cluster import RUN, Cluster, failover, fresh_cluster, jobstream, report, settings_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    own = fresh_cluster("kafka", RUN / "test-kafka")
    try:
        yield own
    finally:
        own.down()


@pytest.mark.timeout(180)
async def test_topics_ensure_replicates_three_times_with_two_in_sync(cluster: Cluster) -> None:
    env = settings_env("kafka", cluster, "clkprovision")
    lines = jobstream(env, "topics", "ensure").splitlines()
    topics = [line.split()[2].rstrip(":") for line in lines if line.startswith("kafka topic ")]
    assert "clkprovision.cluster.effect" in topics and len(topics) >= 4, lines
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap, request_timeout_ms=20_000)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
        replicas = {t["topic"]: {len(p["replicas"]) for p in t["partitions"]} for t in described}
        resources = [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics]
        answers = await admin.describe_configs(resources)
    finally:
        await admin.close()
    assert replicas == {t: {3} for t in topics}
    min_isr = {
        resource[3]: value
        for answer in answers
        for resource in answer.resources
        for name, value, *_ in resource[4]
        if name == "min.insync.replicas"
    }
    assert min_isr == {t: "2" for t in topics}


@pytest.mark.timeout(600)
async def test_partition_leader_and_controller_killed_under_load_lose_nothing(
    cluster: Cluster,
) -> None:
    result = await failover("kafka", cluster, jobs=20_000, rate=500)
    (RUN / "test-kafka.json").write_text(report(result) + "\n")
    print(report(result))
    summary = json.loads(report(result))
    assert [f.what for f in result.faults] == ["partition leader", "controller"], summary
    assert result.worker_exits == [], summary
    assert result.lost == 0 and result.effects == 20_000 - result.failing, summary
    assert result.duplicated == 0, summary
    assert result.confirmed == 20_000 and result.confirmed_lost == 0, summary
    assert result.dead_letters_missing == 0 and result.dead_letters_duplicated == 0, summary
    assert all(f.rate_before > 0 for f in result.faults), summary
    assert all(f.recovered_s is not None and f.recovered_s <= 30 for f in result.faults), summary
