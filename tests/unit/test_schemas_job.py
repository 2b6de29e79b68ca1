"""Declaring job types: class keywords, validation at class creation, registration."""

import pydantic
import pytest

import schemas._job
from schemas import Job, JobRegistry, default_registry


def test_a_declared_job_carries_its_type_and_version() -> None:
    class Ping(Job, type="test.ping", version=3, register=False):
        n: int

    assert Ping.job_type == "test.ping"
    assert Ping.job_version == 3


def test_version_defaults_to_1() -> None:
    class Ping(Job, type="test.ping", register=False):
        pass

    assert Ping.job_version == 1


def test_declaring_a_job_registers_it_in_the_default_registry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert vars(schemas._job)["default_registry"] is default_registry
    # A fresh registry keeps this test's type out of the one other tests export.
    fresh = JobRegistry()
    monkeypatch.setattr(schemas._job, "default_registry", fresh)

    class Ping(Job, type="test.ping"):
        pass

    class Unlisted(Job, type="test.unlisted", register=False):
        pass

    assert list(fresh) == [Ping]
    assert Unlisted not in fresh


def test_abstract_base_without_type_is_allowed_and_not_registered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fresh = JobRegistry()
    monkeypatch.setattr(schemas._job, "default_registry", fresh)

    class Tenanted(Job):
        tenant_id: str

    class Export(Tenanted, type="test.export"):
        table: str

    assert list(fresh) == [Export]
    assert not hasattr(Tenanted, "job_type")
    assert set(Export.model_fields) == {"tenant_id", "table"}


@pytest.mark.parametrize("bad", ["Email.Welcome", "9lives", "", "with space", "a/b", "é"])
def test_a_malformed_type_fails_at_class_creation(bad: str) -> None:
    with pytest.raises(TypeError, match="is not a valid job type"):

        class Bad(Job, type=bad, register=False):
            pass


@pytest.mark.parametrize("bad", [0, -1, True, "1", 1.0])
def test_a_malformed_version_fails_at_class_creation(bad: object) -> None:
    with pytest.raises(TypeError, match="must be an int >= 1"):

        class Bad(Job, type="test.bad", version=bad, register=False):
            pass


def test_version_without_type_is_rejected() -> None:
    with pytest.raises(TypeError, match="without type="):

        class Bad(Job, version=2):
            pass


def test_subclassing_a_concrete_job_needs_its_own_type() -> None:
    class Ping(Job, type="test.ping", register=False):
        pass

    with pytest.raises(TypeError, match=r"Ping \(test.ping v1\) without declaring type="):

        class Pong(Ping):
            pass

    class Pong2(Ping, type="test.pong", register=False):
        pass

    assert (Pong2.job_type, Ping.job_type) == ("test.pong", "test.ping")


def test_jobs_are_frozen_and_reject_unknown_fields() -> None:
    class Ping(Job, type="test.ping", register=False):
        n: int

    ping = Ping(n=1)
    with pytest.raises(pydantic.ValidationError):
        ping.n = 2  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="Extra inputs are not permitted"):
        Ping(n=1, extra=True)  # type: ignore[call-arg]
    assert hash(ping) == hash(Ping(n=1))
