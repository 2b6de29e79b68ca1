"""Security as a user meets it, without a broker (docs/security.md): a CA, certificate or
seed file that cannot be loaded is one line naming its setting at once (not "the broker is
not reachable" after the connect timeout, nor a traceback); a password in a store URL's
query is never printed; the stores' refusals are not waited out; the dashboard served
alone (`jobstream ui`) carries the HTML security headers, and a broker that fails its
dead-letter page is one line, not a bare 500."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from aiokafka.errors import UnsupportedSaslMechanismError
from pydantic import ValidationError

from consumer import Settings
from consumer._run import _without_password
from consumer.stores import MemoryStatusStore
from consumer.stores import store_refused as _refused
from jobstream import _dlq
from jobstream.ui import create_ui_app
from producer import BrokerRefused, BrokerUnavailable, KafkaSettings, NatsSettings
from producer.kafka import _refusal, kafka_client_options
from producer.nats._publisher import _connect_options
from schemas import examples  # noqa: F401 - the job types whose dead letters the page reads
from tests.helm.test_chart import helm, rejection
from tests.support import free_port

__all__ = ["helm"]  # the session fixture of the chart tests

ROOT = Path(__file__).resolve().parents[2]
PUBLISH = [
    "publish",
    "email.welcome",
    "-d",
    '{"user_id": "u1", "email": "a@example.com", "name": "A", "marketing_opt_in": false}',
]


def _files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    return {"missing": tmp_path / "none.pem", "bad": tmp_path / "bad.pem"}


@pytest.mark.parametrize(("which", "reason"), [("missing", "No such file"), ("bad", "NO_CERT")])
def test_a_kafka_ca_file_that_cannot_be_loaded_names_kafka_ssl_cafile(
    tmp_path: Path, which: str, reason: str
) -> None:
    ca = _files(tmp_path)[which]
    settings = KafkaSettings(security_protocol="SASL_SSL", sasl_username="u", ssl_cafile=ca)
    with pytest.raises(ValueError, match=rf"kafka\.ssl_cafile {ca}: .*{reason}") as caught:
        kafka_client_options(settings)
    assert "not a certificate" not in str(caught.value)  # the file's content is never shown


@pytest.mark.parametrize(
    ("field", "setting"),
    [
        ("tls_ca_file", "nats.tls_ca_file"),
        ("nkey_seed_file", "nats.nkey_seed_file"),
        ("credentials_file", "nats.credentials_file"),
    ],
)
def test_a_nats_file_that_cannot_be_loaded_names_its_setting(
    tmp_path: Path, field: str, setting: str
) -> None:
    missing = tmp_path / "none"
    settings = NatsSettings(servers=["tls://127.0.0.1:1"], **{field: missing})
    with pytest.raises(ValueError, match=rf"{setting} {missing}: No such file"):
        _connect_options(settings)
    if field == "tls_ca_file":
        bad = _files(tmp_path)["bad"]
        with pytest.raises(ValueError, match=r"nats\.tls_ca_file .*NO_CERT"):
            _connect_options(NatsSettings(tls_ca_file=bad))


def _cli(args: list[str], **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JOBSTREAM_")}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "jobstream", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    return result, time.monotonic() - started


@pytest.mark.parametrize("transport", ["kafka", "nats"])
def test_the_cli_says_a_missing_ca_file_in_one_line_at_once(tmp_path: Path, transport: str) -> None:
    """Before: Kafka said "not reachable" after `connect_timeout_s` (10 s; a worker after
    `worker.broker_wait_s`), NATS printed a traceback."""
    ca = tmp_path / "none.pem"
    port = free_port()  # nothing listens: the CA must be refused before any connect
    env = {
        "kafka": {
            "JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
            "JOBSTREAM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "JOBSTREAM_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
            "JOBSTREAM_KAFKA__SASL_USERNAME": "u",
            "JOBSTREAM_KAFKA__SASL_PASSWORD": "p",
            "JOBSTREAM_KAFKA__SSL_CAFILE": str(ca),
        },
        "nats": {
            "JOBSTREAM_NATS__SERVERS": json.dumps([f"tls://127.0.0.1:{port}"]),
            "JOBSTREAM_NATS__TLS_CA_FILE": str(ca),
        },
    }[transport]
    for args in (PUBLISH, ["topics", "ensure"], ["dlq", "list"]):
        result, took = _cli(args, JOBSTREAM_TRANSPORT=transport, **env)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert len(lines) == 1, (args, lines[-5:])
        assert f"{transport}.{'ssl_cafile' if transport == 'kafka' else 'tls_ca_file'}" in lines[0]
        assert took < 8.0, (args, took)


def test_a_password_in_a_store_urls_query_is_never_printed() -> None:
    url = "postgresql://jobstream@db:5432/app?sslmode=verify-full&password=S3CRET&x=1"
    shown = _without_password(url)
    assert "S3CRET" not in shown
    assert shown == "postgresql://jobstream@db:5432/app?sslmode=verify-full&password=***&x=1"
    assert "S3CRET" not in _without_password("rediss://db:6380/0?PASSWORD=S3CRET")
    quoted = _without_password("host=db user=jobstream password='S3 CRET' sslmode=require")
    assert "CRET" not in quoted and quoted.endswith("password=*** sslmode=require")
    assert _without_password("redis://:S3CRET@db:6379/0") == "redis://:***@db:6379/0"


@pytest.mark.parametrize(
    "message",
    [
        # the texts psycopg and redis-py raise against the secured local services
        'connection failed: connection to server at "127.0.0.1", port 5433 failed: server '
        'certificate for "127.0.0.1" (and 1 other name) does not match host name "localhost"',
        'connection failed: connection to server at "127.0.0.1", port 5433 failed: '
        "fe_sendauth: no password supplied",
        'connection failed: connection to server at "127.0.0.1", port 5433 failed: FATAL: '
        'pg_hba.conf rejects connection for host "127.0.0.1", user "jobstream", database '
        '"postgres", no encryption',
        'connection failed: connection to server at "127.0.0.1", port 5433 failed: root '
        'certificate file "/x/ca.pem" does not exist',
        "Authentication required.",
    ],
)
def test_a_store_refusal_is_not_waited_out(message: str) -> None:
    assert _refused(ConnectionError(message))


def test_a_store_that_does_not_answer_is_still_waited_for() -> None:
    assert not _refused(
        ConnectionError("Error 111 connecting to 127.0.0.1:6380. Connection refused.")
    )
    assert not _refused(TimeoutError("timed out"))


def _ui() -> httpx.AsyncClient:
    settings = Settings(transport="kafka", status={"backend": "memory"})
    app = create_ui_app(settings, MemoryStatusStore())
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://ui")


async def test_the_dashboard_alone_carries_the_html_security_headers() -> None:
    async with _ui() as http:
        page = await http.get("/ui/jobs")
    assert page.status_code == 200
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["referrer-policy"] == "same-origin"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-request-id"]


@pytest.mark.parametrize(
    "failure",
    [
        BrokerRefused("kafka", "127.0.0.1:9192", "the credentials were refused; check x"),
        BrokerUnavailable("kafka", "127.0.0.1:9192", "KafkaConnectionError: down"),
    ],
)
async def test_a_broker_failing_a_dead_letter_page_is_one_line_not_a_500(
    monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    async def find(*_: object) -> list[object]:
        raise failure

    monkeypatch.setattr(_dlq, "find", find)
    async with _ui() as http:
        page = await http.get("/ui/dead-letters")
    assert page.status_code == 503, page.text
    assert page.text == f"the broker is unavailable: {failure}\n"
    assert page.headers["retry-after"] == "5"


@pytest.mark.parametrize(
    "name", ["JOBSTREAM_KAFKA__SASL_PASSWORD", "jobstream_kafka__sasl_password"]
)
def test_the_chart_takes_no_jobstream_setting_from_extra_env_in_any_case(
    helm: str, name: str
) -> None:
    """pydantic-settings reads environment names in any case: a lower-case name would set
    the plain-text password the chart keeps out of `config` and `extraEnv`."""
    values = {"extraEnv": [{"name": name, "value": "plain-text"}]}
    assert f"extraEnv sets {name}" in rejection(helm, "template", values)


@pytest.mark.parametrize("how", ["file", "value"])
async def test_an_empty_ingress_token_is_refused_not_auth_turned_off(
    tmp_path: Path, how: str
) -> None:
    """An empty Secret mounted as the token file turned `/v1` auth off: every request got
    through without a token."""
    empty = tmp_path / "token"
    empty.write_text("\n")
    given = {"auth_token_file": empty} if how == "file" else {"auth_token": ""}
    with pytest.raises(ValidationError, match=r"ingress\.auth_token(_file)? is empty"):
        Settings(transport="memory", status={"backend": "memory"}, ingress=given)


async def test_a_sasl_mechanism_the_broker_lacks_names_kafka_sasl_mechanism(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seen on the secured Kafka (SCRAM-SHA-512 only) with `SCRAM-SHA-256`: the line asked
    to check the user name and password, which were right."""

    async def create_conn(*_: object, **__: object) -> None:
        raise UnsupportedSaslMechanismError("Kafka broker does not support SCRAM-SHA-256")

    monkeypatch.setattr(_refusal, "create_conn", create_conn)
    settings = KafkaSettings(
        bootstrap_servers="127.0.0.1:9192",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="u",
        sasl_password="p",
    )
    with pytest.raises(BrokerRefused, match=r"SCRAM-SHA-256 .*check kafka\.sasl_mechanism"):
        await _refusal.raise_if_refused(settings, 5.0)
