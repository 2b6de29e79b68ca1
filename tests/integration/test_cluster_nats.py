"""NATS on a three-server JetStream cluster of the module's own (`scripts/cluster.py` on
ports 24232-24234, routes 26232-26234, monitoring 28232-28234): `topics ensure` makes R3
streams and buckets, and 3 workers lose nothing while the stream leader's server is
SIGKILLed and restarted, then all three servers are restarted one by one, under load
(`tests.cluster`: 20,000 jobs at 500 jobs/s, effects counted by job id in PostgreSQL).
Figures in docs/guarantees.md ("Clusters")."""

from __future__ import annotations

import json
from collections.abc import Iterator

import nats
import pytest

from producer import BrokerBusy, DestinationMissing, NatsSettings, RoutingSettings
from producer.nats import NatsPublisher
from tests.cluster import RUN, Cluster, failover, fresh_cluster, jobstream, report, settings_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    own = fresh_cluster("nats", RUN / "test-nats")
    try:
        yield own
    finally:
        own.down()


@pytest.mark.timeout(180)
async def test_topics_ensure_makes_r3_streams_and_buckets(cluster: Cluster) -> None:
    env = settings_env("nats", cluster, "clnprovision")
    lines = jobstream(env, "topics", "ensure").splitlines()
    client = await nats.connect(cluster.nats_urls)
    try:
        js = client.jetstream()
        replicas = {i.config.name: i.config.num_replicas for i in await js.streams_info()}
    finally:
        await client.close()
    ours = {n: r for n, r in replicas.items() if "CLNPROVISION" in n or n.startswith("KV_")}
    assert "CLNPROVISION" in ours and len(ours) >= 3, (lines, replicas)
    assert set(ours.values()) == {3}, ours


@pytest.mark.timeout(180)
async def test_a_publish_to_a_stream_without_a_leader_is_busy_not_missing(
    cluster: Cluster,
) -> None:
    """Nobody answers a publish to a stream that has no leader (its leader's server is
    gone, the rest cannot elect one): that is a retriable `BrokerBusy`, not a missing
    stream. It was `DestinationMissing`, which stopped every worker (a dead letter "could
    not be stored") when a stream leader was killed under load."""
    client = await nats.connect(cluster.nats_urls)
    try:
        js = client.jetstream()
        await js.add_stream(name="CLNLEADERLESS", subjects=["clnleaderless.>"], num_replicas=3)
        leader = (await js.stream_info("CLNLEADERLESS")).cluster.leader  # type: ignore[union-attr]
    finally:
        await client.close()
    assert leader in {"n1", "n2", "n3"}
    survivor = next(n for n in (1, 2, 3) if f"n{n}" != leader)
    others = [n for n in (1, 2, 3) if n != survivor]
    publisher = NatsPublisher(
        NatsSettings(servers=[cluster.nats_urls[survivor - 1]], publish_timeout_s=10),
        RoutingSettings(stream="CLNLEADERLESS", subject_prefix="clnleaderless."),
    )
    await publisher.start()
    try:
        with pytest.raises(DestinationMissing):  # a subject no stream captures: missing
            await publisher.send_raw("clnnowhere.x", {"Nats-Msg-Id": "m1"}, b"{}")
        for node in others:
            cluster.kill(node)
        try:
            with pytest.raises(BrokerBusy):
                await publisher.send_raw("clnleaderless.x", {"Nats-Msg-Id": "m2"}, b"{}")
        finally:
            for node in others:
                cluster.start(node)
    finally:
        await publisher.stop()


@pytest.mark.timeout(600)
async def test_stream_leader_killed_and_rolling_restart_under_load_lose_nothing(
    cluster: Cluster,
) -> None:
    result = await failover("nats", cluster, jobs=20_000, rate=500)
    (RUN / "test-nats.json").write_text(report(result) + "\n")
    print(report(result))
    summary = json.loads(report(result))
    assert [f.what for f in result.faults] == ["stream leader", "rolling restart"], summary
    assert result.worker_exits == [], summary
    assert result.lost == 0 and result.effects == 20_000 - result.failing, summary
    assert result.duplicated == 0, summary
    assert result.confirmed == 20_000 and result.confirmed_lost == 0, summary
    assert result.dead_letters_missing == 0 and result.dead_letters_duplicated == 0, summary
    assert all(f.rate_before > 0 for f in result.faults), summary
    assert all(f.recovered_s is not None and f.recovered_s <= 30 for f in result.faults), summary
