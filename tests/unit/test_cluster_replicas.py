"""Replication chosen from the cluster's size (docs/operations.md): 3 replicas with 2 in
sync on three or more nodes, the node count below, the setting when it is set."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from producer import RoutingSettings
from producer.nats._provision import nats_cluster_size


@pytest.mark.parametrize(
    ("setting", "nodes", "expected"),
    [
        (0, 1, (1, 1)),
        (0, 2, (2, 1)),
        (0, 3, (3, 2)),
        (0, 5, (3, 2)),
        (1, 3, (1, 1)),
        (5, 5, (5, 2)),
        (0, 0, (1, 1)),  # a metadata answer without brokers: still a valid topic request
    ],
)
def test_replicas_and_min_in_sync_follow_the_cluster_size(
    setting: int, nodes: int, expected: tuple[int, int]
) -> None:
    assert RoutingSettings(replication_factor=setting).replicas_for(nodes) == expected


def _client(info: dict[str, Any]) -> Any:
    return SimpleNamespace(_server_info=info)


def test_the_nats_cluster_size_is_read_from_the_servers_info() -> None:
    urls = ["127.0.0.1:4232", "127.0.0.1:4233", "127.0.0.1:4234"]
    assert nats_cluster_size(_client({"cluster": "jobstream", "connect_urls": urls})) == 3
    assert nats_cluster_size(_client({"server_name": "single"})) == 1
    assert nats_cluster_size(_client({"cluster": "jobstream"})) == 1
