"""Security on real secured brokers (docs/security.md): Kafka over SASL_SSL with
SCRAM-SHA-512, NATS over TLS with an nkey, Redis over TLS with a password, PostgreSQL over
TLS with a scram-sha-256 password; every secret from a file.

One module-scoped set of secured services on private ports (`scripts/secure_services.py`,
its own run folder, its own CA), started once: about 10 s, Kafka's start most of it.

- A whole Kafka scenario (topics, publish, a worker with a retry and a dead letter, `dlq
  list`, the ingress's submit and status, /metrics, spans, the status store's keys and
  values, `--help`) and a NATS one run over the secured services, and every byte they
  printed or stored is searched for each secret.
- A wrong password, an unknown user, an untrusted CA and a host name the certificate does
  not hold each end a `publish` with one line naming the setting, exit 1, well within
  the connect timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis

from producer.outbox import outbox_ddl
from tests.support import ROOT, free_port, read_sink, wait_until

pytestmark = pytest.mark.integration

KAFKA_PORT = int(os.environ.get("JOBSTREAM_TEST_SECURE_KAFKA_PORT", "19792"))
NATS_PORT = int(os.environ.get("JOBSTREAM_TEST_SECURE_NATS_PORT", "14922"))
NATS_MONITOR_PORT = int(os.environ.get("JOBSTREAM_TEST_SECURE_NATS_MONITOR_PORT", "18922"))
REDIS_PORT = int(os.environ.get("JOBSTREAM_TEST_SECURE_REDIS_PORT", "16980"))
POSTGRES_PORT = int(os.environ.get("JOBSTREAM_TEST_SECURE_POSTGRES_PORT", "15980"))
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Secured:
    """The secured services of this module: where they are and what reaches them."""

    home: Path  # <run>/secure: ca.pem, other-ca.pem, one file per secret

    def secret(self, name: str) -> str:
        return (self.home / name).read_text().strip()

    def secrets(self) -> dict[str, str]:
        """Every secret a leak would show, by name: passwords, the nkey seed, the body of
        the server's private key."""
        found = {
            name: self.secret(name)
            for name in (
                "kafka-password",
                "kafka-admin-password",
                "nats-password",
                "redis-password",
                "postgres-password",
                "nats-user.nk",
            )
        }
        key_lines = (self.home / "server-key.pem").read_text().splitlines()
        found["server-key"] = "".join(line for line in key_lines if not line.startswith("-----"))
        # The key's body as it would appear split over lines, too: any 40-character line.
        found["server-key-line"] = key_lines[2]
        return found

    def kafka_env(self) -> dict[str, str]:
        return {
            "JOBSTREAM_TRANSPORT": "kafka",
            "JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{KAFKA_PORT}",
            "JOBSTREAM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "JOBSTREAM_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
            "JOBSTREAM_KAFKA__SASL_USERNAME": "jobstream",
            "JOBSTREAM_KAFKA__SASL_PASSWORD_FILE": str(self.home / "kafka-password"),
            "JOBSTREAM_KAFKA__SSL_CAFILE": str(self.home / "ca.pem"),
            "JOBSTREAM_KAFKA__CONNECT_TIMEOUT_S": str(CONNECT_TIMEOUT_S),
            "JOBSTREAM_KAFKA__REQUEST_TIMEOUT_S": str(CONNECT_TIMEOUT_S),
        }

    def nats_env(self) -> dict[str, str]:
        return {
            "JOBSTREAM_TRANSPORT": "nats",
            "JOBSTREAM_NATS__SERVERS": json.dumps([f"tls://127.0.0.1:{NATS_PORT}"]),
            "JOBSTREAM_NATS__NKEY_SEED_FILE": str(self.home / "nats-user.nk"),
            "JOBSTREAM_NATS__TLS_CA_FILE": str(self.home / "ca.pem"),
            "JOBSTREAM_NATS__CONNECT_TIMEOUT_S": str(CONNECT_TIMEOUT_S),
        }

    def stores_env(self) -> dict[str, str]:
        ca = self.home / "ca.pem"
        return {
            "JOBSTREAM_STATUS__BACKEND": "redis",
            "JOBSTREAM_STATUS__URL": f"rediss://127.0.0.1:{REDIS_PORT}/0?ssl_ca_certs={ca}",
            "JOBSTREAM_STATUS__PASSWORD_FILE": str(self.home / "redis-password"),
            "JOBSTREAM_IDEMPOTENCY__BACKEND": "postgres",
            "JOBSTREAM_IDEMPOTENCY__URL": (
                f"postgresql://jobstream@127.0.0.1:{POSTGRES_PORT}/postgres"
                f"?sslmode=verify-full&sslrootcert={ca}"
            ),
            "JOBSTREAM_IDEMPOTENCY__PASSWORD_FILE": str(self.home / "postgres-password"),
        }


def _script(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "JOBSTREAM_LOCAL_RUN_DIR": str(run_dir),
        "JOBSTREAM_SECURE_KAFKA_PORT": str(KAFKA_PORT),
        "JOBSTREAM_SECURE_NATS_PORT": str(NATS_PORT),
        "JOBSTREAM_SECURE_NATS_MONITOR_PORT": str(NATS_MONITOR_PORT),
        "JOBSTREAM_SECURE_REDIS_PORT": str(REDIS_PORT),
        "JOBSTREAM_SECURE_POSTGRES_PORT": str(POSTGRES_PORT),
    }
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/secure_services.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.fixture(scope="module")
def secured() -> Iterator[Secured]:
    # In the repository's .run (not pytest's 0700 temp folder): PostgreSQL runs as the
    # `postgres` user, which must reach its data folder.
    run_dir = ROOT / ".run" / f"secure-test-{os.getpid()}"
    started = _script(run_dir, "up")
    try:
        assert started.returncode == 0, started.stderr
        yield Secured(run_dir / "secure")
    finally:
        _script(run_dir, "down")
        shutil.rmtree(run_dir, ignore_errors=True)


def _env(*parts: dict[str, str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSTREAM_")}
    env.update(
        PYTHONPATH=str(ROOT),
        JOBSTREAM_JOB_MODULES='["tests.apps.recorder"]',
        JOBSTREAM_LOGGING__LEVEL="INFO",
    )
    for part in parts:
        env.update(part)
    env.update(extra)
    return env


def _cli(
    *args: str, env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobstream", *args],
        env=env,
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "jobstream", *args],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _http(
    method: str, url: str, token: str | None = None, body: object = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, data=data, timeout=10) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.terminate()
    return process.wait(60)


def _leaks(captured: dict[str, bytes], secrets: dict[str, str]) -> list[str]:
    return [
        f"{secret_name} in {where}"
        for where, data in captured.items()
        for secret_name, value in secrets.items()
        if value.encode() in data
    ]


def _publish(env: dict[str, str], job: dict[str, object]) -> str:
    published = _cli("publish", "test.record", "--data", json.dumps(job), env=env)
    assert published.returncode == 0, published.stderr
    return str(json.loads(published.stdout.splitlines()[0])["job_id"])


def test_kafka_scenario_over_sasl_ssl_runs_and_shows_no_secret(
    secured: Secured, tmp_path: Path
) -> None:
    """Topics, publish, a worker (a retry, a dead letter), `dlq list`, the ingress (submit,
    status, /ui), /metrics and spans, over SASL_SSL Kafka, TLS Redis and TLS PostgreSQL;
    then every byte printed or stored is searched for every secret."""
    sink = tmp_path / "sink"
    topic = f"secure.{tmp_path.name[-20:]}".replace("_", "-")
    token = "ingress-token-" + os.urandom(12).hex()
    health_port, ingress_port = free_port(), free_port()
    env = _env(
        secured.kafka_env(),
        secured.stores_env(),
        JOBSTREAM_ROUTING__ROUTES=json.dumps({"test.record": topic}),
        JOBSTREAM_ROUTING__PARTITIONS="1",
        JOBSTREAM_RETRY__TIERS_S="[0.5]",
        JOBSTREAM_WORKER__GROUP=f"group-{topic}",
        JOBSTREAM_HEALTH__PORT=str(health_port),
        JOBSTREAM_INGRESS__PORT=str(ingress_port),
        JOBSTREAM_INGRESS__AUTH_TOKEN=token,
        JOBSTREAM_TEST_SINK=str(sink),
        OTEL_TRACES_EXPORTER="console",
    )
    captured: dict[str, bytes] = {}

    def keep(name: str, result: subprocess.CompletedProcess[str]) -> None:
        captured[name] = (result.stdout + result.stderr).encode()

    ensured = _cli("topics", "ensure", env=env)
    keep("topics ensure", ensured)
    assert ensured.returncode == 0, ensured.stderr
    ok = _publish(env, {"seq": 1, "key": "a"})
    retried = _publish(env, {"seq": 2, "key": "b", "behaviour": "fail-once"})
    dead = _publish(env, {"seq": 3, "key": "c", "behaviour": "dead-letter"})
    worker = _start(["worker", "tests.apps.recorder:app"], env, tmp_path / "worker.log")
    ingress = _start(["ingress"], env, tmp_path / "ingress.log")
    try:
        url = f"http://127.0.0.1:{ingress_port}"
        deadline = time.monotonic() + 60
        while _http("GET", f"{url}/readyz")[0] != 200:
            assert time.monotonic() < deadline, (tmp_path / "ingress.log").read_text()[-2000:]
            assert ingress.poll() is None, (tmp_path / "ingress.log").read_text()[-2000:]
            time.sleep(0.2)
        refused, refusal = _http("POST", f"{url}/v1/jobs/test.record", "wrong", {"seq": 9})
        assert refused == 401
        status, answer = _http("POST", f"{url}/v1/jobs/test.record", token, {"seq": 4, "key": "d"})
        assert status == 202, answer
        submitted = json.loads(answer)["job_id"]

        def finished() -> bool:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            return {line.job_id for line in read_sink(sink)} >= {ok, retried, submitted}

        asyncio.run(wait_until(finished, 60, "three jobs done over SASL_SSL"))
        done = read_sink(sink)
        assert sorted(line.job_id for line in done) == sorted([ok, retried, submitted])
        assert next(line.attempt for line in done if line.job_id == retried) == 2

        async def dead_lettered() -> None:
            def listed() -> bool:
                result = _cli("dlq", "list", "--json", "--topic", f"{topic}.dlq", env=env)
                keep("dlq list", result)
                assert result.returncode == 0, result.stderr
                return [json.loads(x)["job_id"] for x in result.stdout.splitlines()] == [dead]

            await wait_until(listed, 60, "the dead letter listed")

        asyncio.run(dead_lettered())

        def status_says_done() -> bool:
            code, body = _http("GET", f"{url}/v1/jobs/{submitted}", token)
            captured["ingress status"] = body
            return code == 200 and json.loads(body).get("state") == "succeeded"

        asyncio.run(wait_until(status_says_done, 30, "the ingress's status says succeeded"))
        for path in (f"/v1/jobs/{dead}", "/ui/", "/ui/jobs", "/ui/dead-letters", "/docs"):
            captured[f"ingress {path}"] = _http("GET", url + path, token)[1]
        captured["ingress refusal"] = refusal
        metrics = _http("GET", f"http://127.0.0.1:{health_port}/metrics")
        assert metrics[0] == 200
        captured["metrics"] = metrics[1]
    finally:
        assert _stop(ingress) == 0
        assert _stop(worker) == 0
    captured["worker log"] = (tmp_path / "worker.log").read_bytes()
    captured["ingress log"] = (tmp_path / "ingress.log").read_bytes()
    assert b'"trace_id"' in captured["worker log"], "the console exporter printed spans"
    store = redis.Redis(
        host="127.0.0.1",
        port=REDIS_PORT,
        ssl=True,
        ssl_ca_certs=str(secured.home / "ca.pem"),
        password=secured.secret("redis-password"),
    )
    try:
        keys = list(store.scan_iter("jobstream:*"))
        assert len(keys) >= 4  # a status per job at least
        dump = [key + b"=" + store.dump(key) for key in keys]  # type: ignore[operator]
    finally:
        store.close()
    captured["status store"] = b"\n".join(dump)
    for command in (["--help"], ["worker", "--help"], ["ingress", "--help"], ["dlq", "--help"]):
        keep(" ".join(command), _cli(*command, env=env))
    secrets = {**secured.secrets(), "ingress token": token}
    planted = {"planted": b"x" + secrets["kafka-password"].encode() + b"x"}
    assert _leaks(planted, secrets) == ["kafka-password in planted"]  # the search finds one
    assert _leaks(captured, secrets) == []
    assert sum(len(data) for data in captured.values()) > 20_000  # it did look at a lot


def test_nats_scenario_over_tls_and_nkey_runs_and_shows_no_secret(
    secured: Secured, tmp_path: Path
) -> None:
    """Stream, publish, a worker (a retry, a dead letter) and `dlq list` over TLS NATS with
    an nkey user; nothing printed holds a secret."""
    sink = tmp_path / "sink"
    name = tmp_path.name[-16:].replace("_", "").replace("-", "")
    env = _env(
        secured.nats_env(),
        JOBSTREAM_ROUTING__STREAM=f"SEC{name}".upper(),
        JOBSTREAM_ROUTING__SUBJECT_PREFIX=f"sec{name}.",
        JOBSTREAM_RETRY__TIERS_S="[0.5]",
        JOBSTREAM_WORKER__GROUP=f"group{name}",
        JOBSTREAM_IDEMPOTENCY__BACKEND="nats-kv",  # the key-value store over the same TLS
        JOBSTREAM_IDEMPOTENCY__NAMESPACE=f"sec{name}",
        JOBSTREAM_HEALTH__PORT="0",
        JOBSTREAM_TEST_SINK=str(sink),
    )
    captured: dict[str, bytes] = {}
    ensured = _cli("topics", "ensure", env=env)
    captured["topics ensure"] = (ensured.stdout + ensured.stderr).encode()
    assert ensured.returncode == 0, ensured.stderr
    ok = _publish(env, {"seq": 1, "key": "a"})
    retried = _publish(env, {"seq": 2, "key": "b", "behaviour": "fail-once"})
    dead = _publish(env, {"seq": 3, "key": "c", "behaviour": "dead-letter"})
    worker = _start(["worker", "tests.apps.recorder:app"], env, tmp_path / "worker.log")
    try:

        def finished() -> bool:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            return {line.job_id for line in read_sink(sink)} >= {ok, retried}

        asyncio.run(wait_until(finished, 60, "two jobs done over TLS NATS"))

        def listed() -> bool:
            result = _cli("dlq", "list", "--json", env=env)
            captured["dlq list"] = (result.stdout + result.stderr).encode()
            assert result.returncode == 0, result.stderr
            return [json.loads(x)["job_id"] for x in result.stdout.splitlines()] == [dead]

        asyncio.run(wait_until(listed, 60, "the dead letter listed"))
    finally:
        assert _stop(worker) == 0
    done = read_sink(sink)
    assert sorted(line.job_id for line in done) == sorted([ok, retried])
    assert next(line.attempt for line in done if line.job_id == retried) == 2
    captured["worker log"] = (tmp_path / "worker.log").read_bytes()
    assert _leaks(captured, secured.secrets()) == []


_REFUSALS = [
    pytest.param(
        "kafka",
        {"JOBSTREAM_KAFKA__SASL_PASSWORD": "wrong-password"},
        "kafka.sasl_password",
        id="kafka-wrong-password",
    ),
    pytest.param(
        "kafka",
        {"JOBSTREAM_KAFKA__SASL_USERNAME": "nobody"},
        "kafka.sasl_username",
        id="kafka-unknown-user",
    ),
    pytest.param("kafka", {"ca": "other-ca.pem"}, "kafka.ssl_cafile", id="kafka-untrusted-ca"),
    pytest.param(
        "kafka",
        {"JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS": f"localhost:{KAFKA_PORT}"},
        "kafka.bootstrap_servers",
        id="kafka-hostname-mismatch",
    ),
    pytest.param(
        "nats",
        {
            "JOBSTREAM_NATS__USER": "jobstream",
            "JOBSTREAM_NATS__PASSWORD": "wrong-password",
            "JOBSTREAM_NATS__NKEY_SEED_FILE": "",
        },
        "nats.password",
        id="nats-wrong-password",
    ),
    pytest.param(
        "nats",
        {
            "JOBSTREAM_NATS__USER": "nobody",
            "JOBSTREAM_NATS__PASSWORD_FILE": "nats-password",
            "JOBSTREAM_NATS__NKEY_SEED_FILE": "",
        },
        "nats.user",
        id="nats-unknown-user",
    ),
    pytest.param("nats", {"ca": "other-ca.pem"}, "nats.tls_ca_file", id="nats-untrusted-ca"),
    pytest.param(
        "nats",
        {"JOBSTREAM_NATS__SERVERS": f'["tls://localhost:{NATS_PORT}"]'},
        "nats.servers",
        id="nats-hostname-mismatch",
    ),
]


@pytest.mark.parametrize(("transport", "change", "setting"), _REFUSALS)
def test_a_refused_connection_is_one_line_naming_the_setting(
    secured: Secured, transport: str, change: dict[str, str], setting: str
) -> None:
    env = _env(secured.kafka_env() if transport == "kafka" else secured.nats_env())
    for name, value in change.items():
        if name == "ca":
            ca_setting = "SSL_CAFILE" if transport == "kafka" else "TLS_CA_FILE"
            env[f"JOBSTREAM_{transport.upper()}__{ca_setting}"] = str(secured.home / value)
        elif name.endswith("_FILE") and value:
            env[name] = str(secured.home / value)
        elif value:
            env[name] = value
        else:
            del env[name]
    if "JOBSTREAM_KAFKA__SASL_PASSWORD" in env:
        del env["JOBSTREAM_KAFKA__SASL_PASSWORD_FILE"]
    started = time.monotonic()
    result = _cli("publish", "test.record", "--data", '{"seq": 1, "key": "a"}', env=env)
    elapsed = time.monotonic() - started
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {transport} at ") and "refused the connection" in lines[0]
    assert setting in lines[0]
    assert elapsed < CONNECT_TIMEOUT_S  # refused at once, not retried until the timeout
    assert _leaks({"stderr": result.stderr.encode()}, secured.secrets()) == []


@pytest.mark.parametrize(
    "command", [["dlq", "list"], ["topics", "ensure"], ["ingress"]], ids=" ".join
)
def test_the_tools_say_a_refusal_in_one_line(secured: Secured, command: list[str]) -> None:
    env = _env(
        secured.kafka_env(),
        JOBSTREAM_KAFKA__SASL_USERNAME="nobody",
        JOBSTREAM_STATUS__BACKEND="memory",
        JOBSTREAM_INGRESS__PORT=str(free_port()),
    )
    started = time.monotonic()
    result = _cli(*command, env=env)
    assert time.monotonic() - started < CONNECT_TIMEOUT_S + 5
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: kafka at ") and "kafka.sasl_username" in lines[0]


@pytest.mark.parametrize(
    ("store", "change"),
    [
        ("status", {"JOBSTREAM_STATUS__PASSWORD_FILE": "wrong"}),
        ("idempotency", {"JOBSTREAM_IDEMPOTENCY__PASSWORD_FILE": "wrong"}),
        ("status", {"ca": "JOBSTREAM_STATUS__URL"}),
    ],
    ids=["redis-wrong-password", "postgres-wrong-password", "redis-untrusted-ca"],
)
def test_a_store_refusal_stops_the_worker_with_one_line(
    secured: Secured, tmp_path: Path, store: str, change: dict[str, str]
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    env = _env(
        secured.kafka_env(),
        secured.stores_env(),
        JOBSTREAM_WORKER__BROKER_WAIT_S="60",
        JOBSTREAM_HEALTH__PORT="0",
        JOBSTREAM_TEST_SINK=str(tmp_path / "sink"),
    )
    for name, value in change.items():
        if name == "ca":
            env[value] = env[value].replace("ca.pem", "other-ca.pem")
        else:
            env[name] = str(wrong)
    started = time.monotonic()
    result = _cli("worker", "tests.apps.recorder:app", env=env)
    assert time.monotonic() - started < 20  # not the 60 s of broker_wait_s
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the {store} store at ") and "refused the connection" in last
    assert f"{store}.password_file" in last
    output = result.stdout + result.stderr
    assert "not-the-password" not in output
    assert _leaks({"output": output.encode()}, secured.secrets()) == []


@pytest.mark.parametrize("transport", ["kafka", "nats"])
def test_a_worker_with_a_wrong_password_stops_with_one_line(
    secured: Secured, tmp_path: Path, transport: str
) -> None:
    """The worker does not wait out `worker.broker_wait_s` on a refusal: it exits 1 with
    the line naming the setting."""
    password = tmp_path / "password"
    password.write_text("not-the-password\n")
    if transport == "kafka":
        broker = {**secured.kafka_env(), "JOBSTREAM_KAFKA__SASL_PASSWORD_FILE": str(password)}
    else:
        broker = {**secured.nats_env(), "JOBSTREAM_NATS__USER": "jobstream"}
        broker["JOBSTREAM_NATS__PASSWORD_FILE"] = str(password)
        del broker["JOBSTREAM_NATS__NKEY_SEED_FILE"]
    env = _env(
        broker,
        JOBSTREAM_WORKER__BROKER_WAIT_S="60",
        JOBSTREAM_HEALTH__PORT="0",
        JOBSTREAM_TEST_SINK=str(tmp_path / "sink"),
    )
    started = time.monotonic()
    result = _cli("worker", "tests.apps.recorder:app", env=env)
    assert time.monotonic() - started < 15  # not the 60 s of broker_wait_s
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    setting = "kafka.sasl_password" if transport == "kafka" else "nats.password"
    assert last.startswith(f"error: {transport} at ") and setting in last
    assert "not-the-password" not in result.stdout + result.stderr


def test_unique_keys_and_the_outbox_read_their_postgres_password_from_a_file(
    secured: Secured, tmp_path: Path
) -> None:
    """`unique.password_file` and `outbox.password_file` over TLS PostgreSQL: two publishes
    of one unique key give one job id; `outbox status` reads the table; a wrong password
    file is one line naming the setting's URL, without the password."""
    ca = secured.home / "ca.pem"
    database = (
        f"postgresql://jobstream@127.0.0.1:{POSTGRES_PORT}/postgres"
        f"?sslmode=verify-full&sslrootcert={ca}"
    )
    password = secured.home / "postgres-password"
    topic = f"secure.unique.{tmp_path.name[-20:]}".replace("_", "-")
    env = _env(
        secured.kafka_env(),
        JOBSTREAM_ROUTING__ROUTES=json.dumps({"test.record": topic}),
        JOBSTREAM_ROUTING__PARTITIONS="1",
        JOBSTREAM_UNIQUE__URL=database,
        JOBSTREAM_UNIQUE__PASSWORD_FILE=str(password),
    )
    assert _cli("topics", "ensure", env=env).returncode == 0
    key = f"k-{tmp_path.name}"
    ids = []
    for _ in range(2):
        published = _cli(
            "publish", "test.record", "--data", '{"seq": 1, "key": "a"}', "--unique-key", key,
            "--unique-for", "60", env=env,
        )  # fmt: skip
        assert published.returncode == 0, published.stderr
        ids.append(json.loads(published.stdout.splitlines()[0])["job_id"])
    assert ids[0] == ids[1]

    table = f"outbox_{tmp_path.name[-20:]}".replace("-", "_")
    with psycopg.connect(database, password=secured.secret("postgres-password")) as conn:
        for statement in outbox_ddl(table):
            conn.execute(statement)
    outbox = _env(
        JOBSTREAM_OUTBOX__URL=database,
        JOBSTREAM_OUTBOX__PASSWORD_FILE=str(password),
        JOBSTREAM_OUTBOX__TABLE=table,
    )
    status = _cli("outbox", "status", "--json", env=outbox)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) == {
        "waiting": 0, "set_aside": 0, "sent": 0, "oldest_waiting_s": 0.0,
    }  # fmt: skip

    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    refused = _cli(
        "outbox", "status", env={**outbox, "JOBSTREAM_OUTBOX__PASSWORD_FILE": str(wrong)}
    )
    assert refused.returncode != 0
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "password authentication failed" in refused.stderr
    assert "not-the-password" not in refused.stderr + refused.stdout
    missing = _cli(
        "outbox",
        "status",
        env={**outbox, "JOBSTREAM_OUTBOX__PASSWORD_FILE": str(tmp_path / "none")},
    )
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: cannot read outbox.password_file"), missing.stderr
