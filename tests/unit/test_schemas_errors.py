"""The error tree: reasons, retriability, messages that name the problem, pickling."""

import pickle

import pytest

from schemas import (
    InvalidAttributes,
    InvalidPayload,
    JobDecodeError,
    JobstreamError,
    UndecodableBody,
    UnknownJobType,
    UnsupportedVersion,
)

REASONS = {
    InvalidAttributes: "invalid-attributes",
    UndecodableBody: "undecodable-body",
    UnknownJobType: "unknown-type",
    UnsupportedVersion: "unsupported-version",
    InvalidPayload: "invalid-payload",
}


@pytest.mark.parametrize(("cls", "reason"), REASONS.items())
def test_decode_errors_dead_letter_with_their_reason(
    cls: type[JobDecodeError], reason: str
) -> None:
    assert issubclass(cls, JobDecodeError)
    assert issubclass(cls, JobstreamError)
    assert cls.reason == reason
    assert cls.retriable is False


def test_reasons_are_unique() -> None:
    assert len(set(REASONS.values())) == len(REASONS)


def test_a_subclass_with_a_malformed_reason_fails_at_class_creation() -> None:
    with pytest.raises(TypeError, match="kebab-case"):

        class Bad(JobstreamError):
            reason = "Not_Kebab"


def test_other_packages_can_add_retriable_branches() -> None:
    class BrokerUnavailable(JobstreamError):
        retriable = True
        reason = "broker-unavailable"

    assert BrokerUnavailable.retriable
    assert not JobstreamError.retriable


def test_unknown_type_names_registered_types_and_what_to_do() -> None:
    err = UnknownJobType("email.welcom", ["email.welcome", "image.resize"])
    assert "'email.welcom'" in str(err)
    assert "email.welcome, image.resize" in str(err)
    assert "import the module" in str(err)


def test_unsupported_version_names_supported_versions() -> None:
    err = UnsupportedVersion("email.welcome", 3, [2, 1])
    assert "version 3" in str(err)
    assert "v1, v2" in str(err)
    assert err.supported == [1, 2]


def test_invalid_payload_names_nested_fields_and_caps_the_list() -> None:
    errors = [{"type": "x", "loc": ("items", i, "name"), "msg": "bad"} for i in range(8)]
    err = InvalidPayload("report.generate v1", errors)
    assert str(err).startswith("report.generate v1: field 'items[0].name': bad; ")
    assert "and 3 more" in str(err)
    assert "items[7]" not in str(err)
    whole = InvalidPayload("x v1", [{"type": "model_type", "loc": (), "msg": "not an object"}])
    assert "x v1: payload: not an object" in str(whole)


@pytest.mark.parametrize(
    "err",
    [
        InvalidAttributes("missing ce_id"),
        UndecodableBody("not JSON"),
        UnknownJobType("t", ["a"]),
        UnsupportedVersion("t", 2, [1]),
        InvalidPayload("t v1", [{"type": "int_type", "loc": ("n",), "msg": "not an int"}]),
    ],
)
def test_errors_survive_pickling(err: JobDecodeError) -> None:
    # Errors cross process boundaries when CPU-bound jobs run in a process pool.
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is type(err)
    assert str(copy) == str(err)
