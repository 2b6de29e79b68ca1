"""JobRegistry: lookup by (type, version), conflicts, deterministic iteration."""

import pytest

from schemas import Job, JobRegistry, UnknownJobType, UnsupportedVersion
from schemas.examples import GenerateReport, ResizeImage, SendWelcomeEmail, SendWelcomeEmailV2


def make_registry() -> JobRegistry:
    return JobRegistry([SendWelcomeEmailV2, ResizeImage, SendWelcomeEmail, GenerateReport])


def test_v1_and_v2_of_a_type_coexist_and_resolve_separately() -> None:
    registry = make_registry()
    assert registry.resolve("email.welcome", 1) is SendWelcomeEmail
    assert registry.resolve("email.welcome", 2) is SendWelcomeEmailV2
    assert registry.latest("email.welcome") is SendWelcomeEmailV2


def test_unknown_type_names_the_registered_types() -> None:
    with pytest.raises(UnknownJobType, match=r"email\.welcome, image\.resize, report\.generate"):
        make_registry().resolve("email.welcom", 1)
    with pytest.raises(UnknownJobType):
        make_registry().latest("nope")


def test_unsupported_version_names_the_supported_versions() -> None:
    with pytest.raises(UnsupportedVersion, match=r"version 3 \(supported: v1, v2\)") as info:
        make_registry().resolve("email.welcome", 3)
    assert info.value.supported == [1, 2]


def test_iteration_is_sorted_by_type_then_version() -> None:
    registry = make_registry()
    assert list(registry) == [SendWelcomeEmail, SendWelcomeEmailV2, ResizeImage, GenerateReport]
    assert registry.job_types() == ["email.welcome", "image.resize", "report.generate"]
    assert len(registry) == 4


def test_contains_a_class_or_a_type_name() -> None:
    registry = JobRegistry([SendWelcomeEmail])
    assert SendWelcomeEmail in registry
    assert "email.welcome" in registry
    assert SendWelcomeEmailV2 not in registry
    assert "image.resize" not in registry
    assert 42 not in registry


def test_a_different_class_for_a_taken_type_and_version_is_a_conflict() -> None:
    registry = JobRegistry([SendWelcomeEmail])

    class Impostor(Job, type="email.welcome", version=1, register=False):
        pass

    with pytest.raises(
        ValueError, match=r"already registered by schemas\.examples\.SendWelcomeEmail"
    ):
        registry.register(Impostor)
    assert registry.resolve("email.welcome", 1) is SendWelcomeEmail


def test_registering_the_same_class_again_is_a_no_op() -> None:
    registry = JobRegistry([SendWelcomeEmail])
    assert registry.register(SendWelcomeEmail) is SendWelcomeEmail
    assert len(registry) == 1


def test_a_redeclared_class_with_the_same_name_replaces_the_old_one() -> None:
    # What happens when a module is reloaded: a new class object, same module and name.
    def declare() -> type[Job]:
        class Reloaded(Job, type="test.reloaded", register=False):
            pass

        return Reloaded

    registry = JobRegistry()
    first, second = declare(), declare()
    registry.register(first)
    registry.register(second)
    assert registry.resolve("test.reloaded", 1) is second
    assert len(registry) == 1


def test_only_concrete_job_classes_can_be_registered() -> None:
    class Abstract(Job):
        pass

    registry = JobRegistry()
    for bad in (Abstract, int, "email.welcome"):
        with pytest.raises(TypeError, match="not a concrete Job class"):
            registry.register(bad)  # type: ignore[type-var]


def test_register_works_as_a_decorator() -> None:
    registry = JobRegistry()

    @registry.register
    class Ping(Job, type="test.ping", register=False):
        pass

    assert registry.resolve("test.ping", 1) is Ping
