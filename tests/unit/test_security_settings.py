"""Secrets from files, the refusal lines, and what the ingress adds to every answer
(docs/security.md). No broker: the memory transport, httpx's ASGI transport."""

from __future__ import annotations

import logging
import ssl
import uuid
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from consumer import Settings
from consumer.stores import MemoryStatusStore
from jobstream._ingress import create_app
from producer import KafkaSettings, NatsSettings
from producer._refusals import tls_refusal
from producer.kafka import kafka_client_options
from producer.memory import BROKER
from producer.nats._refusal import nats_refusal
from producer.secrets import with_password
from schemas import Job, JobRegistry


class Order(Job, type="test.security.order", version=1, register=False):
    order_id: str


def test_a_password_file_is_read_without_its_newline_and_never_shown(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret-from-a-file\n")
    settings = KafkaSettings(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="u",
        sasl_password_file=secret,
    )
    assert kafka_client_options(settings)["sasl_plain_password"] == "s3cret-from-a-file"
    assert "s3cret" not in repr(settings) + str(settings.model_dump())
    secret.write_text("rotated\n")  # read at each connect: a rotated Secret needs no restart
    assert kafka_client_options(settings)["sasl_plain_password"] == "rotated"


def test_a_secret_and_its_file_together_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"kafka\.sasl_password or kafka\.sasl_password_file"):
        KafkaSettings(sasl_password="a", sasl_password_file=Path("/x"))
    with pytest.raises(ValidationError, match=r"nats\.password or nats\.password_file"):
        NatsSettings(password="a", password_file=Path("/x"))


def test_an_unreadable_password_file_names_the_setting_not_the_secret(tmp_path: Path) -> None:
    settings = KafkaSettings(
        security_protocol="SASL_SSL", sasl_username="u", sasl_password_file=tmp_path / "none"
    )
    with pytest.raises(ValueError, match=r"kafka\.sasl_password_file .*No such file"):
        kafka_client_options(settings)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "rediss://127.0.0.1:6380/0?ssl_ca_certs=/ca.pem",
            "rediss://:p%40ss%3Aw@127.0.0.1:6380/0?ssl_ca_certs=/ca.pem",
        ),
        ("postgresql://jobstream@db:5433/app", "postgresql://jobstream:p%40ss%3Aw@db:5433/app"),
        ("postgresql://jobstream:old@db/app", "postgresql://jobstream:p%40ss%3Aw@db/app"),
        ("host=db user=jobstream", "host=db user=jobstream password='p@ss:w'"),
    ],
)
def test_a_store_password_file_goes_into_the_url(tmp_path: Path, url: str, expected: str) -> None:
    secret = tmp_path / "password"
    secret.write_text("p@ss:w\n")
    assert with_password(url, secret, "status.password_file") == expected
    assert with_password(url, None, "status.password_file") == url


def test_tls_and_credential_refusals_name_the_setting() -> None:
    untrusted = ssl.SSLCertVerificationError(1, "certificate verify failed")
    untrusted.verify_message = "unable to get local issuer certificate"
    mismatch = ssl.SSLCertVerificationError(1, "certificate verify failed")
    mismatch.verify_message = "Hostname mismatch, certificate is not valid for 'localhost'."
    assert "set kafka.ssl_cafile" in (tls_refusal(untrusted, "kafka.ssl_cafile", "x") or "")
    assert "(kafka.bootstrap_servers)" in (
        tls_refusal(mismatch, "kafka.ssl_cafile", "kafka.bootstrap_servers") or ""
    )
    assert tls_refusal(ConnectionRefusedError(), "a", "b") is None
    denied = Exception("nats: 'Authorization Violation'")
    seeded = NatsSettings(nkey_seed_file=Path("/seed"))
    assert "nats.nkey_seed_file" in (nats_refusal(seeded, denied) or "")
    assert "nats.user and nats.password" in (nats_refusal(NatsSettings(user="u"), denied) or "")
    assert nats_refusal(NatsSettings(), TimeoutError()) is None


def _client(**ingress: object) -> tuple[httpx.AsyncClient, str]:
    topic = f"security-{uuid.uuid4().hex[:8]}"
    BROKER.create_topic(topic)
    settings = Settings(
        transport="memory",
        routing={"routes": {"test.security.order": topic}},
        status={"backend": "memory"},
        ingress=ingress,
    )
    app = create_app(settings, MemoryStatusStore(), registry=JobRegistry([Order]))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://ingress"), topic


async def test_request_ids_are_answered_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    http, _ = _client()
    caplog.set_level(logging.INFO, "jobstream.ingress")
    async with http:
        given = await http.post(
            "/v1/jobs/test.security.order",
            json={"order_id": "1"},
            headers={"X-Request-Id": "abc-1"},
        )
        hostile = await http.get("/v1/jobs/x", headers={"X-Request-Id": "a b\nforged"})
    assert given.status_code == 202 and given.headers["x-request-id"] == "abc-1"
    made = hostile.headers["x-request-id"]
    assert len(made) == 32 and made != "a b\nforged"
    lines = [(r.getMessage(), getattr(r, "job", {})) for r in caplog.records]
    assert ("POST /v1/jobs/test.security.order 202", "abc-1") in [
        (message, job.get("request_id")) for message, job in lines
    ]
    assert any(job.get("request_id") == made and job.get("status") == 404 for _, job in lines)


async def test_no_cors_unless_configured_and_html_pages_carry_security_headers() -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    http, _ = _client()
    async with http:
        refused = await http.options("/v1/jobs/test.security.order", headers=preflight)
        page = await http.get("/ui/jobs")
        api = await http.get("/v1/jobs/none")
    assert "access-control-allow-origin" not in refused.headers
    assert page.status_code == 200
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "same-origin"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "x-frame-options" not in api.headers  # JSON answers: not a page
    http, _ = _client(cors_origins=["https://app.example"])
    async with http:
        allowed = await http.options("/v1/jobs/test.security.order", headers=preflight)
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"


async def test_the_token_from_a_file_guards_the_api(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("file-token\n")
    http, _ = _client(auth_token_file=str(token))
    async with http:
        without = await http.get("/v1/jobs/x")
        wrong = await http.get("/v1/jobs/x", headers={"Authorization": "Bearer file-token2"})
        right = await http.get("/v1/jobs/x", headers={"Authorization": "Bearer file-token"})
    assert (without.status_code, wrong.status_code, right.status_code) == (401, 401, 404)
