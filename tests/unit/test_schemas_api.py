"""The public surface of `schemas`: exactly these names, each importable, no I/O modules."""

import subprocess
import sys
from typing import assert_type

import schemas
from schemas.examples import GenerateReport

EXPECTED = {
    "MAX_HEADER_BYTES",
    "DecodedJob",
    "InvalidAttributes",
    "InvalidPayload",
    "Job",
    "JobAttributes",
    "JobDecodeError",
    "JobMessage",
    "JobRegistry",
    "JobstreamError",
    "UndecodableBody",
    "UnknownJobType",
    "UnreadableRecord",
    "UnsupportedVersion",
    "decode",
    "default_registry",
    "encode",
    "export_json_schemas",
    "foreign_headers",
    "from_kafka",
    "from_nats",
    "header_bytes",
    "to_kafka",
    "to_nats",
    "validate_payload",
}


def test_all_is_exactly_the_public_api() -> None:
    assert set(schemas.__all__) == EXPECTED
    assert len(schemas.__all__) == len(EXPECTED)


def test_every_exported_name_resolves() -> None:
    for name in schemas.__all__:
        assert getattr(schemas, name) is not None, name


def test_importing_schemas_loads_no_broker_or_async_modules() -> None:
    # A fresh interpreter: pytest itself has already imported asyncio in this one.
    code = (
        "import sys, schemas, schemas.examples;"
        "bad = [m for m in ('asyncio', 'aiokafka', 'nats', 'opentelemetry.sdk') "
        "if m in sys.modules]; print(bad)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_importing_schemas_does_not_register_the_examples() -> None:
    code = "import schemas; print(len(schemas.default_registry))"
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True
    )
    assert result.stdout.strip() == "0", result.stderr


def test_validate_payload_returns_the_model_it_was_given() -> None:
    report = schemas.validate_payload(GenerateReport, {"account_id": "a", "month": "2025-01"})
    assert_type(report, GenerateReport)
    assert isinstance(report, GenerateReport)
    assert_type(schemas.default_registry.resolve("report.generate", 1), type[schemas.Job])
