"""The consumer's public surface, pinned (as httpx's test_exported_members): a name added to
or dropped from an `__all__` must be a decision, made here too."""

from __future__ import annotations

import importlib
import types

import pytest

import consumer

EXPECTED = {
    "consumer": {
        "App",
        "Backend",
        "ClaimState",
        "CronSchedule",
        "DeadLetter",
        "IdempotencyStore",
        "JobContext",
        "JobTimeout",
        "MemoryIdempotencyStore",
        "Retry",
        "Settings",
        "Worker",
        "WorkerError",
        "backend_for",
        "open_worker",
        "run_worker",
    },
    "consumer.kafka": {
        "BACKEND",
        "KafkaBackend",
        "KafkaSource",
        "ReplayLedger",
        "list_dead_letters",
        "read_topics",
        "replay",
    },
    "consumer.memory": {"BACKEND", "MemoryBackend", "MemorySource", "Settlement", "TestApp"},
}
SUBPACKAGES = [
    "consumer.core",
    "consumer.stores",
    "consumer.telemetry",
    "consumer.steps",
    "consumer.runtime",
    "consumer.kafka",
    "consumer.nats",
    "consumer.memory",
]


@pytest.mark.parametrize("package", sorted(EXPECTED))
def test_all_is_exactly_the_public_api(package: str) -> None:
    module = importlib.import_module(package)
    assert set(module.__all__) == EXPECTED[package]


@pytest.mark.parametrize("package", ["consumer", *SUBPACKAGES])
def test_every_exported_name_exists_and_nothing_public_is_unlisted(package: str) -> None:
    module = importlib.import_module(package)
    exported = set(module.__all__)
    assert all(getattr(module, name, None) is not None for name in exported)
    defined = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert defined == exported, f"{package}: public but not in __all__: {defined - exported}"


@pytest.mark.parametrize("transport", ["kafka", "nats", "memory"])
def test_backend_for_returns_the_package_backend(transport: str) -> None:
    backend = consumer.backend_for(transport)
    assert backend is importlib.import_module(f"consumer.{transport}").BACKEND
    assert backend.features.name == transport


def test_backend_for_an_unknown_transport_says_what_exists() -> None:
    with pytest.raises(ValueError, match="use kafka, nats or memory"):
        consumer.backend_for("rabbitmq")
