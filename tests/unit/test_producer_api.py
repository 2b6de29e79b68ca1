"""The public surface of `producer`: exports, error tree, settings and their docs."""

from __future__ import annotations

import ast
import importlib
import inspect
import itertools
import pickle
import re
from pathlib import Path
from typing import assert_type

import pytest
from pydantic import BaseModel

import producer
from producer import (
    BrokerBusy,
    BrokerRefused,
    BrokerUnavailable,
    DestinationMissing,
    JobProducer,
    KafkaSettings,
    NatsSettings,
    ProducerSettings,
    PublishError,
    PublishTimeout,
    Receipt,
    RecordTooLarge,
    RoutingSettings,
    SpoolFull,
    SpoolLocked,
    SpoolSettings,
    plan_destinations,
)
from producer.nats import stream_subjects
from producer.nats._provision import _covers
from schemas import JobstreamError

ROOT = Path(__file__).resolve().parents[2]

EXPECTED = {
    "CONFIG_FILE_ENV",
    "ENV_PREFIX",
    "BrokerBusy",
    "BrokerRefused",
    "BrokerUnavailable",
    "DestinationHook",
    "DestinationMissing",
    "JobProducer",
    "KafkaSettings",
    "NatsSettings",
    "MemoryUniqueStore",
    "NotASpool",
    "PRIORITIES",
    "Priority",
    "ProducerSettings",
    "PublishError",
    "PublishRequest",
    "PublishTimeout",
    "RecordTooLarge",
    "Publisher",
    "Receipt",
    "RoutingSettings",
    "SpoolFull",
    "SpoolLocked",
    "SpoolSettings",
    "SpoolStatus",
    "SyncJobProducer",
    "Transport",
    "UniqueKeyBusy",
    "UniqueSettings",
    "UniqueStore",
    "UniqueStoreUnavailable",
    "destination_level",
    "plan_destinations",
    "read_spool_status",
}
BACKENDS = {
    "producer.kafka": {
        "KafkaPublisher",
        "ensure_kafka_topics",
        "kafka_client_options",
        "kafka_replication",
        "make_publisher",
        "start_client",
    },
    "producer.nats": {
        "KEY_PARTITIONS_METADATA",
        "NatsPublisher",
        "connect_nats",
        "ensure_nats_stream",
        "key_partition",
        "make_publisher",
        "nats_replicas",
        "stream_subjects",
    },
    "producer.memory": {
        "BROKER",
        "CommitFailed",
        "MemoryBroker",
        "MemoryFaults",
        "MemoryPublisher",
        "MemoryRecord",
        "RecordTooLarge",
        "TopicPartition",
        "make_publisher",
    },
}


def test_all_is_exactly_the_public_api() -> None:
    assert set(producer.__all__) == EXPECTED
    for name in producer.__all__:
        assert getattr(producer, name) is not None


@pytest.mark.parametrize("package", sorted(BACKENDS))
def test_each_backend_package_exports_exactly_its_api(package: str) -> None:
    module = importlib.import_module(package)
    assert set(module.__all__) == BACKENDS[package]
    for name in module.__all__:
        assert getattr(module, name) is not None


def test_public_signatures_are_typed() -> None:
    async def check(p: JobProducer, job: producer.PublishRequest) -> None:
        assert_type(await p.publish(job.job), Receipt)
        assert_type(await p.publish_many([job]), list[Receipt])

    assert inspect.iscoroutinefunction(check)


@pytest.mark.parametrize(
    ("error", "retriable", "reason"),
    [
        (PublishError("x"), False, "publish-error"),
        (BrokerUnavailable("kafka", "127.0.0.1:1", "refused"), True, "broker-unavailable"),
        (PublishTimeout("nats", "jobs.x", 2.5), True, "publish-timeout"),
        (BrokerRefused("kafka", "127.0.0.1:1", "fix kafka.ssl_cafile"), False, "broker-refused"),
        (DestinationMissing("kafka", "jobs.x"), False, "destination-missing"),
        (BrokerBusy("kafka", "jobs.x", "NotLeaderForPartitionError"), True, "broker-busy"),
        (RecordTooLarge("nats", "jobs.x", "maximum payload exceeded"), False, "record-too-large"),
        (SpoolFull("/var/spool.db", "3 of 3 jobs"), True, "spool-full"),
    ],
)
def test_errors_carry_behaviour_and_pickle(
    error: PublishError, retriable: bool, reason: str
) -> None:
    assert isinstance(error, JobstreamError)
    assert (error.retriable, error.reason) == (retriable, reason)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy)) == (type(error), str(error))


def test_spool_locked_names_the_path_and_pickles() -> None:
    error = SpoolLocked("/var/spool.db")
    assert (error.retriable, error.reason) == (False, "spool-locked")
    assert "/var/spool.db" in str(error)
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


def test_error_messages_say_what_to_do() -> None:
    assert "make up" in str(BrokerUnavailable("kafka", "127.0.0.1:1", "refused"))
    assert "127.0.0.1:1" in str(BrokerUnavailable("kafka", "127.0.0.1:1", "refused"))
    assert "same job id" in str(PublishTimeout("kafka", "jobs.x", 2))
    assert "jobstream topics ensure" in str(DestinationMissing("nats", "jobs.x"))


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBSTREAM_TRANSPORT", "nats")
    monkeypatch.setenv("JOBSTREAM_KAFKA__LINGER_MS", "20")
    monkeypatch.setenv("JOBSTREAM_NATS__SERVERS", '["nats://a:4222","nats://b:4222"]')
    monkeypatch.setenv("JOBSTREAM_ROUTING__ROUTES", '{"email.welcome": "mail"}')
    monkeypatch.setenv("JOBSTREAM_ROUTING__DUPLICATE_WINDOW_S", "30")
    settings = ProducerSettings()
    assert settings.transport == "nats"
    assert settings.kafka.linger_ms == 20
    assert settings.nats.servers == ["nats://a:4222", "nats://b:4222"]
    assert settings.routing.subject("email.welcome") == "mail"
    assert settings.routing.duplicate_window_s == 30
    assert "secret" not in repr(KafkaSettings(sasl_password="secret"))  # type: ignore[arg-type]


def _documented_fields(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> the docstring under it in the class body."""
    tree = ast.parse(inspect.getsource(model))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for statement, following in itertools.pairwise(body):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
        ):
            docs[statement.target.id] = str(following.value.value)
    return docs


SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("", ProducerSettings),
    ("KAFKA__", KafkaSettings),
    ("NATS__", NatsSettings),
    ("ROUTING__", RoutingSettings),
    ("SPOOL__", SpoolSettings),
]


@pytest.mark.parametrize(("prefix", "model"), SECTIONS)
def test_every_setting_has_a_docstring_and_a_row_in_the_docs(
    prefix: str, model: type[BaseModel]
) -> None:
    documented = _documented_fields(model)
    configuration = (ROOT / "docs" / "configuration.md").read_text()
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            continue  # a section: its fields are checked with their own prefix
        assert name in documented, f"{model.__name__}.{name} has no docstring"
        env = f"JOBSTREAM_{prefix}{name.upper()}"
        assert re.search(rf"`{env}`", configuration), f"{env} is not in docs/configuration.md"


def test_stream_subjects_use_one_wildcard_for_the_prefix() -> None:
    assert stream_subjects("jobs.", ["jobs.a", "jobs.b.c", "other.x"]) == ["jobs.>", "other.x"]
    assert stream_subjects("jobs", ["jobsa", "jobsb"]) == ["jobsa", "jobsb"]
    assert _covers("jobs.>", "jobs.a.b")
    assert not _covers("jobs.>", "jobs")
    assert _covers("jobs.*", "jobs.a")
    assert not _covers("jobs.*", "jobs.a.b")
    assert _covers("a.b", "a.b")
    assert not _covers("a.b", "a.b.c")


def test_plan_destinations_follows_routing_and_hooks() -> None:
    settings = ProducerSettings(routing=RoutingSettings(routes={"b": "custom"}))
    hooks = [lambda job_type, main: [f"{main}.retry", f"{main}.dlq"]]
    assert plan_destinations(settings, ["a", "b"], hooks) == [
        "jobs.a", "jobs.a.retry", "jobs.a.dlq", "custom", "custom.retry", "custom.dlq",
    ]  # fmt: skip
    nats = ProducerSettings(transport="nats", routing=RoutingSettings(subject_prefix="s."))
    assert plan_destinations(nats, ["a", "a"]) == ["s.a"]
