"""JSON Schema export: deterministic text, and schemas that agree with the models."""

import json
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

from schemas import Job, JobRegistry, encode, export_json_schemas
from schemas.examples import GenerateReport, ResizeImage, SendWelcomeEmail, SendWelcomeEmailV2

MODELS: list[type[Job]] = [SendWelcomeEmail, SendWelcomeEmailV2, ResizeImage, GenerateReport]
PAYLOADS: dict[str, dict[str, Any]] = {
    "email.welcome/v1.schema.json": {"user_id": "42", "email": "ada@example.com", "name": "Ada"},
    "email.welcome/v2.schema.json": {
        "user_id": "42",
        "email": "ada@example.com",
        "name": "Ada",
        "locale": "pt-BR",
        "marketing_opt_in": False,
    },
    "image.resize/v1.schema.json": {
        "upload_id": "up-7",
        "source_url": "https://cdn.example.com/7.png",
        "width": 640,
        "height": 480,
    },
    "report.generate/v1.schema.json": {"account_id": "acme", "month": "2025-01"},
}


def exported() -> dict[str, str]:
    return export_json_schemas(JobRegistry(MODELS))


def validator(path: str) -> jsonschema.Draft202012Validator:
    schema = json.loads(exported()[path])
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_export_is_deterministic_and_independent_of_registration_order() -> None:
    first = exported()
    assert first == export_json_schemas(JobRegistry(reversed(MODELS)))
    assert sorted(first) == sorted([*PAYLOADS, "index.json"])
    for path, text in first.items():
        assert text.endswith("}\n"), path
        assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"


def test_each_schema_identifies_its_job_type_and_version() -> None:
    schema = json.loads(exported()["email.welcome/v2.schema.json"])
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == "urn:jobstream:schema:email.welcome:v2"
    assert schema["title"] == "email.welcome v2"
    assert (schema["x-jobstream-type"], schema["x-jobstream-version"]) == ("email.welcome", 2)
    assert schema["additionalProperties"] is False
    assert schema["properties"]["email"]["description"]


def test_the_dataschema_attribute_points_at_the_exported_schema() -> None:
    job = SendWelcomeEmailV2.model_validate(PAYLOADS["email.welcome/v2.schema.json"])
    schema = json.loads(exported()["email.welcome/v2.schema.json"])
    assert encode(job, source="/s").attributes.dataschema == schema["$id"]


def test_index_lists_every_schema() -> None:
    index = json.loads(exported()["index.json"])
    assert [(job["type"], job["version"], job["path"]) for job in index["jobs"]] == [
        ("email.welcome", 1, "email.welcome/v1.schema.json"),
        ("email.welcome", 2, "email.welcome/v2.schema.json"),
        ("image.resize", 1, "image.resize/v1.schema.json"),
        ("report.generate", 1, "report.generate/v1.schema.json"),
    ]


@pytest.mark.parametrize("path", PAYLOADS)
def test_exported_schemas_accept_the_example_payloads(path: str) -> None:
    validator(path).validate(PAYLOADS[path])


def test_exported_schemas_accept_what_encode_produces() -> None:
    for model in MODELS:
        path = f"{model.job_type}/v{model.job_version}.schema.json"
        body = encode(model.model_validate(PAYLOADS[path]), source="/s").body
        validator(path).validate(json.loads(body))


@pytest.mark.parametrize(
    ("path", "change"),
    [
        ("email.welcome/v1.schema.json", {"email": "not-an-address"}),
        ("email.welcome/v1.schema.json", {"surprise": True}),
        ("email.welcome/v2.schema.json", {"marketing_opt_in": "yes"}),
        ("image.resize/v1.schema.json", {"width": "640"}),
        ("image.resize/v1.schema.json", {"height": 0}),
        ("image.resize/v1.schema.json", {"format": "gif"}),
        ("report.generate/v1.schema.json", {"month": "2025-1"}),
    ],
)
def test_exported_schemas_reject_bad_payloads(path: str, change: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validator(path).validate({**PAYLOADS[path], **change})


def test_missing_required_fields_are_rejected() -> None:
    payload = dict(PAYLOADS["report.generate/v1.schema.json"])
    del payload["month"]
    with pytest.raises(jsonschema.ValidationError, match="'month' is a required property"):
        validator("report.generate/v1.schema.json").validate(payload)
