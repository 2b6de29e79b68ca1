"""The Helm chart: lint, render, validate, and keep the chart and the settings in step.

No cluster and no broker. `helm template` renders the chart for a matrix of values (Kafka
and NATS; KEDA, HPA and fixed replicas; with and without the ingress; chart-made and
existing Secrets; with a ServiceMonitor). kubernetes-validate checks every manifest against
the Kubernetes schemas in strict mode (an unknown field fails); the custom resources it has
no schema for (KEDA, Prometheus Operator) are skipped by kind and their key fields asserted
here instead. Every environment variable the chart sets must name a field of
`consumer.Settings`, and the rendered environment must load into `Settings()`, so renaming a
setting without the chart (or the reverse) fails here.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from consumer import Settings
from jobstream._config import OutboxSettings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "jobstream"
KUBE_VERSION = "1.31.0"
RELEASE, NAMESPACE = "demo", "jobs"
WORKER = f"{RELEASE}-jobstream-worker"
INGRESS = f"{RELEASE}-jobstream-ingress"

# Kinds whose schemas kubernetes-validate does not bundle (CRDs); their fields are asserted
# by hand below.
CRD_KINDS = frozenset({"ScaledObject", "TriggerAuthentication", "ServiceMonitor"})

# Settings the chart sets itself rather than through `config`.
CHART_OWNED = frozenset({"health.host", "spool.path"})  # spool.path: ingress.spool

# Where the chart's schema is deliberately narrower than the settings model.
SCHEMA_NARROWER = {
    "transport": {"enum": ["kafka", "nats"]},  # `memory` is in-process: useless in a cluster
    "health.port": {"minimum": 1},  # 0 turns the endpoint off, but the probes need it
}

# The first build of helm (scripts/helm.sh, once per machine) takes minutes.
pytestmark = pytest.mark.timeout(900)

CA, CERT, KEY = "-----BEGIN CERTIFICATE-----\nca\n", "-----BEGIN CERTIFICATE-----\nc\n", "k"
KAFKA_SASL = {
    "security_protocol": "SASL_SSL",
    "sasl_mechanism": "SCRAM-SHA-512",
    "sasl_username": "jobs-worker",
}
OTEL_ENV = [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel-collector:4318"}]

CASES: dict[str, dict[str, Any]] = {
    "kafka-fixed-defaults": {},
    "kafka-keda-chart-secrets": {
        "config": {
            "kafka": {"bootstrap_servers": "kafka-0:9093,kafka-1:9093", **KAFKA_SASL},
            "idempotency": {"backend": "redis"},
            "worker": {"group": "mail-workers", "drain_timeout_s": 42.5},
        },
        "secrets": {
            "values": {
                "kafka": {"sasl_password": "s3cret", "ssl_password": "keypass"},
                "idempotency": {"url": "redis://:pw@redis:6379/0"},
            }
        },
        "secretFiles": {
            "files": {"ca.crt": CA, "client.crt": CERT, "client.key": KEY},
            "settings": {
                "kafka": {
                    "ssl_cafile": "ca.crt",
                    "ssl_certfile": "client.crt",
                    "ssl_keyfile": "client.key",
                }
            },
        },
        "autoscaling": {
            "keda": {
                "enabled": True,
                "minReplicas": 0,
                "maxReplicas": 12,
                "kafka": {
                    "topics": [
                        "jobs.email.welcome",
                        "jobs.email.welcome.retry.1",
                        "jobs.email.welcome.retry.2",
                    ],
                    "lagThreshold": 250,
                },
            }
        },
    },
    "kafka-hpa-existing-secrets-servicemonitor": {
        "config": {"kafka": {"bootstrap_servers": "kafka:9093", **KAFKA_SASL}},
        "secrets": {"existingSecret": "jobstream-broker"},
        "secretFiles": {
            "existingSecret": "jobstream-tls",
            "settings": {"kafka": {"ssl_cafile": "ca.crt"}},
        },
        "autoscaling": {"hpa": {"enabled": True, "minReplicas": 2, "maxReplicas": 6}},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    },
    "kafka-keda-group-topics-ingress": {
        "config": {
            "source": "/services/signup",
            "create_missing": False,
            "job_modules": ["schemas.examples", "mail.jobs"],
            "worker": {"max_in_flight": 128, "ordering": "partition", "subscribe_types": []},
            "routing": {"routes": {"email.welcome": "mail-jobs"}, "stream_max_age_s": 3600.5},
            "logging": {"level": "DEBUG"},
            "health": {"port": 9090},
            "status": {"backend": "redis"},
            "retry": {
                "policy": {"max_attempts": 8, "initial_delay_s": 0.5},
                "per_type": {"report.generate": {"max_attempts": 2}},
                "tiers_s": [10, 60, 600],
                "non_retriable": ["mail.errors.BadAddress"],
            },
        },
        "autoscaling": {"keda": {"enabled": True}},
        "secrets": {"values": {"status": {"url": "redis://redis:6379/0"}}},
        "ingress": {
            "enabled": True,
            "kubernetesIngress": {
                "enabled": True,
                "className": "nginx",
                "tls": [{"secretName": "jobs-tls", "hosts": ["jobs.example.com"]}],
            },
        },
        "extraEnv": OTEL_ENV,
    },
    "nats-keda-chart-secrets": {
        "config": {
            "transport": "nats",
            "nats": {"servers": ["nats://nats-0:4222", "nats://nats-1:4222"]},
            "routing": {"stream": "MAIL"},
        },
        "secrets": {"values": {"nats": {"token": "t0ken"}}},
        "secretFiles": {
            "files": {"user.creds": "-----BEGIN NATS USER JWT-----\n"},
            "settings": {"nats": {"credentials_file": "user.creds"}},
        },
        "autoscaling": {"keda": {"enabled": True, "nats": {"monitoringEndpoint": "nats:8222"}}},
    },
    "nats-fixed-existing-secrets-ingress-servicemonitor": {
        "config": {"transport": "nats", "nats": {"user": "worker"}, "status": {"backend": "redis"}},
        "secrets": {"existingSecret": "jobstream-nats"},
        "secretFiles": {
            "existingSecret": "jobstream-nats-tls",
            "settings": {"nats": {"tls_ca_file": "ca.pem", "credentials_file": "w.creds"}},
        },
        "worker": {"replicas": 3, "terminationGracePeriodSeconds": 90},
        "ingress": {"enabled": True},
        "metrics": {"serviceMonitor": {"enabled": True}},
        "podDisruptionBudget": {"maxUnavailable": "25%"},
    },
    "kafka-outbox-relay": {
        "outboxRelay": {
            "enabled": True,
            "table": "orders_outbox",
            "urlSecret": {"name": "orders-db", "key": "url"},
        },
    },
    "nats-hpa-recreate-digest": {
        "config": {"transport": "nats"},
        "image": {"repository": "registry.example.com/mail", "digest": "sha256:" + "0" * 64},
        "worker": {"strategy": {"type": "Recreate"}},
        "autoscaling": {"hpa": {"enabled": True}},
        "podDisruptionBudget": {"enabled": False},
        "serviceAccount": {"create": False},
    },
}


# --- helpers -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def helm() -> str:
    """The helm binary: scripts/helm.sh builds it once into .cache/bin and prints its path."""
    result = subprocess.run(
        [str(ROOT / "scripts" / "helm.sh")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"scripts/helm.sh failed:\n{result.stderr}"
    return result.stdout.strip().splitlines()[-1]


def run_helm(helm: str, command: str, values: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    args = [helm, command]
    if command == "template":
        args += [RELEASE, "--namespace", NAMESPACE]
    else:
        args += ["--strict"]
    args += [str(CHART), "--kube-version", KUBE_VERSION, "--values", "-"]
    return subprocess.run(
        args, input=json.dumps(values), capture_output=True, text=True, check=False, timeout=120
    )


def render(helm: str, values: dict[str, Any]) -> list[dict[str, Any]]:
    result = run_helm(helm, "template", values)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def rejection(helm: str, command: str, values: dict[str, Any]) -> str:
    result = run_helm(helm, command, values)
    assert result.returncode != 0, f"helm {command} accepted {values}"
    return " ".join((result.stderr + result.stdout).split())


def only(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                yield doc["metadata"]["name"], container


def container_env(
    docs: list[dict[str, Any]], container: dict[str, Any]
) -> tuple[dict[str, str], set[str]]:
    """The environment a container gets from the chart's objects, and the names of the
    Secrets it reads that the chart did not render (existing Secrets: contents unknown)."""
    env: dict[str, str] = {}
    external: set[str] = set()
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(by_name["ConfigMap", source["configMapRef"]["name"]]["data"])
        else:
            secret = by_name.get(("Secret", source["secretRef"]["name"]))
            if secret is None:
                external.add(source["secretRef"]["name"])
            else:
                decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
                env.update(decoded)
    for variable in container.get("env", []):
        env[variable["name"]] = variable.get("value", "")
    return env, external


def settings_fields(model: type[BaseModel] = Settings, path: str = "") -> dict[str, str]:
    """setting path (`worker.max_in_flight`) -> environment variable, walked from the model."""
    fields: dict[str, str] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields.update(settings_fields(annotation, f"{path}{name}."))
        else:
            fields[f"{path}{name}"] = "JOBSTREAM_" + f"{path}{name}".replace(".", "__").upper()
    return fields


SETTINGS = settings_fields()
# `jobstream outbox relay` reads the `outbox` section besides the worker's settings.
OUTBOX_ENV = frozenset(f"JOBSTREAM_OUTBOX__{name.upper()}" for name in OutboxSettings.model_fields)
SETTINGS_ENV = frozenset(SETTINGS.values()) | OUTBOX_ENV


def config_of(values: dict[str, Any], section: str) -> dict[str, Any]:
    return dict(values.get("config", {}).get(section, {}))


def transport_of(values: dict[str, Any]) -> str:
    return str(values.get("config", {}).get("transport", "kafka"))


def config_leaves(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(setting path, value) for every setting in a `config` tree of values."""
    for name, value in tree.items():
        path = f"{prefix}{name}"
        if isinstance(value, dict) and path not in SETTINGS:
            yield from config_leaves(value, f"{path}.")
        else:
            yield path, value


def assert_matches(actual: Any, path: str, expected: Any) -> None:
    """`actual` (settings, a section, a map) holds `expected` at `path`; a map of expected
    values is compared key by key, so a model may hold more fields than the values name."""
    for name in path.split(".") if path else []:
        actual = actual[name] if isinstance(actual, dict) else getattr(actual, name)
    if isinstance(expected, dict):
        for key, value in expected.items():
            item = actual[key] if isinstance(actual, dict) else getattr(actual, key)
            assert_matches(item, "", value)
    else:
        assert actual == expected, path


@pytest.fixture(scope="module")
def rendered(helm: str) -> dict[str, list[dict[str, Any]]]:
    return {case: render(helm, values) for case, values in CASES.items()}


# --- lint and Kubernetes validation --------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_lint_strict_is_clean(helm: str, case: str) -> None:
    result = run_helm(helm, "lint", CASES[case])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout
    assert "[ERROR]" not in result.stdout


@pytest.mark.parametrize("case", CASES)
def test_every_manifest_validates_strictly(
    rendered: dict[str, list[dict[str, Any]]], case: str
) -> None:
    docs = rendered[case]
    checked = []
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue  # not in kubernetes-validate's schemas: asserted by the tests below
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        checked.append(doc["kind"])
    assert {"ConfigMap", "Deployment"} <= set(checked)


@pytest.mark.parametrize("case", CASES)
def test_objects_follow_the_values(rendered: dict[str, list[dict[str, Any]]], case: str) -> None:
    values, docs = CASES[case], rendered[case]
    autoscaling = values.get("autoscaling", {})
    keda = autoscaling.get("keda", {}).get("enabled", False)
    hpa = autoscaling.get("hpa", {}).get("enabled", False)
    ingress = values.get("ingress", {}).get("enabled", False)
    worker = only(docs, "Deployment", WORKER)
    assert ("replicas" in worker["spec"]) is not (keda or hpa), "autoscaled: replicas unset"
    assert kinds(docs).count("ScaledObject") == int(keda)
    assert kinds(docs).count("HorizontalPodAutoscaler") == int(hpa)
    assert any(name == INGRESS for name, _ in containers(docs)) is ingress
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    if values.get("podDisruptionBudget", {}).get("enabled", True):
        assert len(pdbs) == 1 + int(ingress)
        for pdb in pdbs:
            target = only(docs, "Deployment", pdb["metadata"]["name"])
            pod_labels = target["spec"]["template"]["metadata"]["labels"]
            assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    else:
        assert pdbs == []
    if hpa:
        hpa_doc = only(docs, "HorizontalPodAutoscaler")
        assert hpa_doc["apiVersion"] == "autoscaling/v2"
        assert hpa_doc["spec"]["scaleTargetRef"]["name"] == WORKER
        assert hpa_doc["spec"]["metrics"][0]["resource"]["name"] == "cpu"


# --- custom resources, asserted by hand ------------------------------------------------------


@pytest.mark.parametrize("case", [c for c in CASES if "keda" in c])
def test_keda_scaledobject(rendered: dict[str, list[dict[str, Any]]], case: str) -> None:
    values, docs = CASES[case], rendered[case]
    keda = values["autoscaling"]["keda"]
    scaled = only(docs, "ScaledObject", WORKER)
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"name": WORKER, "envSourceContainerName": "worker"}
    assert spec["minReplicaCount"] == keda.get("minReplicas", 1)
    assert spec["maxReplicaCount"] == keda.get("maxReplicas", 10)
    group = config_of(values, "worker").get("group", "jobstream-workers")
    triggers = spec["triggers"]
    if transport_of(values) == "kafka":
        topics = keda.get("kafka", {}).get("topics", [])
        assert [t.get("metadata", {}).get("topic") for t in triggers] == (topics or [None])
        kafka = config_of(values, "kafka")
        for trigger in triggers:
            meta = trigger["metadata"]
            assert trigger["type"] == "kafka"
            assert meta["bootstrapServers"] == kafka.get("bootstrap_servers", "kafka:9092")
            assert meta["consumerGroup"] == group
            assert meta["lagThreshold"] == str(keda.get("kafka", {}).get("lagThreshold", 100))
            assert meta["allowIdleConsumers"] == "false"  # never beyond the partition count
            assert meta["offsetResetPolicy"] == "earliest"  # as the worker's consumer
            if kafka.get("security_protocol") == "SASL_SSL":
                assert meta["sasl"] == "scram_sha512"
                assert meta["tls"] == "enable"
                assert trigger["authenticationRef"] == {"name": f"{WORKER}-kafka"}
    else:
        (trigger,) = triggers
        meta = trigger["metadata"]
        assert trigger["type"] == "nats-jetstream"
        assert meta["natsServerMonitoringEndpoint"] == keda["nats"]["monitoringEndpoint"]
        assert meta["consumer"] == group
        assert meta["stream"] == config_of(values, "routing").get("stream", "JOBS")
        assert meta["account"] == "$G"


def test_keda_kafka_credentials_come_from_the_worker(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["kafka-keda-chart-secrets"]
    auth = only(docs, "TriggerAuthentication", f"{WORKER}-kafka")
    env_params = {e["parameter"]: e for e in auth["spec"]["env"]}
    assert set(env_params) == {"username", "password", "keyPassword"}
    worker_env, _ = container_env(docs, next(c for _, c in containers(docs)))
    for param in env_params.values():
        assert param["containerName"] == "worker"
        assert param["name"] in worker_env, f"{param['name']} is not in the worker's env"
    files = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
    assert {p: r["key"] for p, r in files.items()} == {
        "ca": "ca.crt",
        "cert": "client.crt",
        "key": "client.key",
    }
    files_secret = only(docs, "Secret", f"{RELEASE}-jobstream-files")
    for ref in files.values():
        assert ref["name"] == files_secret["metadata"]["name"]
        assert ref["key"] in files_secret["data"]


def test_no_trigger_authentication_without_kafka_security(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for case in ("kafka-keda-group-topics-ingress", "nats-keda-chart-secrets"):
        assert "TriggerAuthentication" not in kinds(rendered[case])


@pytest.mark.parametrize("case", [c for c in CASES if "servicemonitor" in c])
def test_servicemonitor_scrapes_the_health_port(
    rendered: dict[str, list[dict[str, Any]]], case: str
) -> None:
    docs = rendered[case]
    monitor = only(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("health", "/metrics")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    labels = CASES[case]["metrics"]["serviceMonitor"].get("labels", {})
    assert labels.items() <= monitor["metadata"]["labels"].items()
    service = only(docs, "Service", f"{RELEASE}-jobstream-metrics")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert service["spec"]["clusterIP"] == "None"
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["targetPort"]) == ("health", "health")
    worker = only(docs, "Deployment", WORKER)
    pod_labels = worker["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


# --- the chart and the settings cannot drift -------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_every_variable_names_a_setting(
    rendered: dict[str, list[dict[str, Any]]], case: str
) -> None:
    docs = rendered[case]
    extra = {e["name"] for e in CASES[case].get("extraEnv", [])}
    for deployment, container in containers(docs):
        env, _ = container_env(docs, container)
        jobstream = {name for name in env if name.startswith("JOBSTREAM_")}
        assert jobstream - SETTINGS_ENV == set(), f"{deployment}: not settings of consumer.Settings"
        assert set(env) - jobstream == extra, f"{deployment}: only extraEnv may add others"
    for doc in docs:
        if doc["kind"] == "TriggerAuthentication":
            assert {e["name"] for e in doc["spec"].get("env", [])} <= SETTINGS_ENV


@pytest.mark.parametrize("case", CASES)
def test_rendered_environment_loads_into_settings(
    rendered: dict[str, list[dict[str, Any]]], case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    values, docs = CASES[case], rendered[case]
    worker = next(c for name, c in containers(docs) if name == WORKER)
    env, external = container_env(docs, worker)
    transport = transport_of(values)
    required = {"JOBSTREAM_TRANSPORT", "JOBSTREAM_WORKER__GROUP", "JOBSTREAM_HEALTH__PORT"}
    required.add(
        "JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS" if transport == "kafka" else "JOBSTREAM_NATS__SERVERS"
    )
    assert required <= set(env)
    assert env["JOBSTREAM_HEALTH__HOST"] == "0.0.0.0"
    existing = values.get("secrets", {}).get("existingSecret")
    assert external == ({existing} if existing else set())  # its contents come at run time
    for name in list(os.environ):
        if name.startswith("JOBSTREAM_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if existing and config_of(values, "status").get("backend") == "redis":
        # The existing Secret supplies the URL at run time; stand in for it here.
        monkeypatch.setenv("JOBSTREAM_STATUS__URL", "redis://from-the-existing-secret:6379/0")

    settings = Settings()

    assert settings.transport == transport
    assert settings.worker.group == config_of(values, "worker").get("group", "jobstream-workers")
    assert settings.health.host == "0.0.0.0"
    port = {p["name"]: p["containerPort"] for p in worker["ports"]}["health"]
    assert settings.health.port == port
    other = {"kafka", "nats"} - {transport}
    for path, expected in config_leaves(values.get("config", {})):
        if path.split(".")[0] not in other and expected not in ("", [], {}):
            assert_matches(settings, path, expected)
    mount = "/etc/jobstream/secrets"
    for name, file in values.get("secretFiles", {}).get("settings", {}).get(transport, {}).items():
        assert str(getattr(getattr(settings, transport), name)) == f"{mount}/{file}"
    secret_values = values.get("secrets", {}).get("values", {})
    for name, secret in secret_values.get(transport, {}).items():
        assert getattr(getattr(settings, transport), name).get_secret_value() == secret


@pytest.mark.parametrize("case", CASES)
def test_probes_security_and_storage(rendered: dict[str, list[dict[str, Any]]], case: str) -> None:
    docs = rendered[case]
    for deployment, container in containers(docs):
        pod = only(docs, "Deployment", deployment)["spec"]["template"]["spec"]
        port_name = "http" if deployment == INGRESS else "health"
        assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": port_name}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port_name}
        assert port_name in {p["name"] for p in container["ports"]}
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"] == {"drop": ["ALL"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        assert container["resources"]["requests"]["cpu"]
    worker = next(c for name, c in containers(docs) if name == WORKER)
    assert worker["command"] == ["jobstream", "worker", "examples.app:app"]
    # The start-up probe outlasts worker.broker_wait_s (60 s): a worker still waiting for
    # its broker at start is not restarted by the liveness probe.
    startup = worker["startupProbe"]
    assert startup["httpGet"] == {"path": "/livez", "port": "health"}
    assert startup["periodSeconds"] * startup["failureThreshold"] > 60
    if any(name == INGRESS for name, _ in containers(docs)):
        ingress = next(c for name, c in containers(docs) if name == INGRESS)
        assert ingress["command"] == ["jobstream", "ingress"]


@pytest.mark.parametrize("case", CASES)
def test_grace_period_outlasts_the_drain(
    rendered: dict[str, list[dict[str, Any]]], case: str
) -> None:
    values = CASES[case]
    pod = only(rendered[case], "Deployment", WORKER)["spec"]["template"]["spec"]
    drain = config_of(values, "worker").get("drain_timeout_s", 25)
    explicit = values.get("worker", {}).get("terminationGracePeriodSeconds")
    expected = explicit if explicit is not None else math.ceil(drain) + 15
    assert pod["terminationGracePeriodSeconds"] == expected
    assert pod["terminationGracePeriodSeconds"] > drain


def test_chart_fallbacks_are_the_code_defaults(helm: str) -> None:
    # With the keys removed (null deletes a default in Helm), the chart falls back on its own
    # copies of the code's defaults: they must agree with the settings model.
    docs = render(
        helm,
        {
            "config": {
                "transport": "nats",
                "worker": {"drain_timeout_s": None, "group": None},
                "health": None,
            },
            "autoscaling": {"keda": {"enabled": True}},
        },
    )
    pod = only(docs, "Deployment", WORKER)["spec"]["template"]["spec"]
    drain = code_default("worker.drain_timeout_s")
    assert pod["terminationGracePeriodSeconds"] == math.ceil(drain) + 15
    assert pod["containers"][0]["ports"][0]["containerPort"] == code_default("health.port")
    meta = only(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]
    assert meta["stream"] == code_default("routing.stream")
    assert meta["consumer"] == code_default("worker.group")


def code_default(path: str) -> Any:
    """The default of a setting, from the model (not from the environment)."""
    model: Any = Settings
    *sections, name = path.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    return model.model_fields[name].get_default(call_default_factory=True)


def _settings_schema() -> tuple[dict[str, Any], dict[str, str]]:
    """consumer.Settings as the chart's `config` schema must state it: every setting with its
    type and bounds (no titles, defaults or descriptions; $refs resolved), and the format of
    each leaf that has one ("password": a secret, "path": a file)."""
    schema = Settings.model_json_schema()
    formats: dict[str, str] = {}

    def normalize(prop: dict[str, Any], path: str) -> dict[str, Any]:
        if "$ref" in prop:
            prop = schema["$defs"][prop["$ref"].rsplit("/", 1)[-1]]
        options = [p for p in prop.get("anyOf", [prop]) if p.get("type") != "null"]
        assert len(options) == 1, f"{path}: a union the chart schema cannot state"
        prop = options[0]
        if "format" in prop and path:
            formats[path] = prop["format"]
        keep = (
            "type",
            "enum",
            "propertyNames",
            "minimum",
            "maximum",
            "exclusiveMinimum",
            "exclusiveMaximum",
        )
        out = {k: v for k, v in prop.items() if k in keep}
        if "items" in prop:
            out["items"] = normalize(prop["items"], "")
        if "properties" in prop:
            out["additionalProperties"] = False
            out["properties"] = {
                name: normalize(sub, f"{path}.{name}" if path else name)
                for name, sub in prop["properties"].items()
            }
        elif isinstance(prop.get("additionalProperties"), dict):
            out["additionalProperties"] = normalize(prop["additionalProperties"], "")
        return out

    return normalize(schema, ""), formats


def _prune(node: dict[str, Any], drop: set[str], path: str = "") -> dict[str, Any]:
    """A copy of a settings schema without the settings in `drop` (dotted paths)."""
    if "properties" not in node:
        return node
    properties = {}
    for name, sub in node["properties"].items():
        sub_path = f"{path}.{name}" if path else name
        if sub_path not in drop:
            properties[name] = _prune(sub, drop, sub_path) if sub.get("properties") else sub
    return {**node, "properties": properties}


def _strip(node: Any) -> Any:
    """A schema without descriptions and `required` lists (names under `properties` stay)."""
    if not isinstance(node, dict):
        return node
    out = {k: _strip(v) for k, v in node.items() if k not in ("description", "required")}
    if "properties" in node:
        out["properties"] = {name: _strip(sub) for name, sub in node["properties"].items()}
    return out


def expected_config_schema() -> dict[str, Any]:
    """What values.schema.json must say under `config`: the plain settings of the model."""
    schema, formats = _settings_schema()
    config = _prune(schema, set(formats) | CHART_OWNED)
    for path, narrower in SCHEMA_NARROWER.items():
        node = config
        for name in path.split("."):
            node = node["properties"][name]
        node.update(narrower)
    return config


def _leaf_paths(node: dict[str, Any], prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for name, prop in node["properties"].items():
        if "properties" in prop:
            paths |= _leaf_paths(prop, f"{prefix}{name}.")
        else:
            paths.add(f"{prefix}{name}")
    return paths


def test_values_schema_matches_the_settings_model() -> None:
    chart = json.loads((CHART / "values.schema.json").read_text())["properties"]
    expected = expected_config_schema()
    assert _leaf_paths(_settings_schema()[0]) == set(SETTINGS)
    actual = _strip(chart["config"])
    missing = _leaf_paths(expected) - _leaf_paths(actual)
    extra = _leaf_paths(actual) - _leaf_paths(expected)
    fix = f"The schema's `config` should be:\n{json.dumps(expected, indent=2)}"
    assert not missing, f"values.schema.json `config` lacks the settings {sorted(missing)}. {fix}"
    assert not extra, f"values.schema.json `config` has {sorted(extra)}: not settings. {fix}"
    assert actual == expected, f"values.schema.json `config` differs from the model. {fix}"
    _, formats = _settings_schema()
    secret = {path for path, fmt in formats.items() if fmt == "password"}
    files = {path for path, fmt in formats.items() if fmt == "path"} - CHART_OWNED
    files |= {"outbox.password_file"}  # the relay's (`OutboxSettings`), not the worker's
    assert _leaf_paths(chart["secrets"]["properties"]["values"]) == secret
    assert _leaf_paths(chart["secretFiles"]["properties"]["settings"]) == files


def test_map_settings_are_one_variable_each(helm: str) -> None:
    # A map-typed setting (routing.routes) is one JSON variable, not a section to walk into:
    # the chart keeps a list of them, which must name every map-typed field of the model.
    schema, _ = _settings_schema()
    map_settings = {
        path
        for path in SETTINGS
        if "properties" not in (node := _node(schema, path))
        and isinstance(node.get("additionalProperties"), dict)
    }
    assert map_settings, "expected routing.routes at least"
    values: dict[str, Any] = {"config": {}}
    for path in map_settings:
        node = _node(schema, path)
        value_type = node["additionalProperties"].get("type")
        sample = {"object": {"max_attempts": 3}, "integer": 7}.get(value_type, "mail-jobs")
        names = node.get("propertyNames", {}).get("enum", ["email.welcome"])
        _set(values["config"], path, {names[0]: sample})
    docs = render(helm, values)
    data = only(docs, "ConfigMap")["data"]
    for path in map_settings:
        hint = f"{path} is a map: list it in jobstream.mapSettings (templates/_helpers.tpl)"
        assert SETTINGS[path] in data, hint
        assert json.loads(data[SETTINGS[path]]) == _get(values["config"], path), path


def _node(schema: dict[str, Any], path: str) -> dict[str, Any]:
    for name in path.split("."):
        schema = schema["properties"][name]
    return schema


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *sections, name = path.split(".")
    for section in sections:
        tree = tree.setdefault(section, {})
    tree[name] = value


def _get(tree: dict[str, Any], path: str) -> Any:
    for name in path.split("."):
        tree = tree[name]
    return tree


# --- bad values are refused with a message that says what to change --------------------------

BAD_VALUES = {
    "negative-replicas": ({"worker": {"replicas": -1}}, ["/worker/replicas", "minimum: got -1"]),
    "ingress-without-status-store": (
        {"ingress": {"enabled": True}},
        ["ingress.enabled needs the shared job status store", "config.status.backend=redis"],
    ),
    "status-store-without-url": (
        {"config": {"status": {"backend": "redis"}}},
        ["config.status.backend=redis needs its URL", "secrets.values.status.url"],
    ),
    "grace-shorter-than-drain": (
        {"worker": {"terminationGracePeriodSeconds": 20}},
        [
            "worker.terminationGracePeriodSeconds (20) must be longer than",
            "config.worker.drain_timeout_s (25)",
        ],
    ),
    "grace-equal-to-drain": (
        {
            "config": {"worker": {"drain_timeout_s": 60}},
            "worker": {"terminationGracePeriodSeconds": 60},
        },
        ["must be longer than config.worker.drain_timeout_s (60)"],
    ),
    "keda-and-hpa": (
        {"autoscaling": {"keda": {"enabled": True}, "hpa": {"enabled": True}}},
        ["autoscaling.keda.enabled and autoscaling.hpa.enabled are mutually exclusive"],
    ),
    "unknown-transport": (
        {"config": {"transport": "rabbitmq"}},
        ["/config/transport", "value must be one of 'kafka', 'nats'"],
    ),
    "unknown-setting": (
        {"config": {"worker": {"max_inflight": 10}}},
        ["/config/worker", "additional properties 'max_inflight' not allowed"],
    ),
    "secret-in-config": (
        {"config": {"kafka": {"sasl_password": "oops"}}},
        ["/config/kafka", "additional properties 'sasl_password' not allowed"],
    ),
    "setting-out-of-range": (
        {"config": {"worker": {"max_in_flight": 0}}},
        ["/config/worker/max_in_flight", "minimum: got 0, want 1"],
    ),
    "jobstream-variable-in-extra-env": (
        {"extraEnv": [{"name": "JOBSTREAM_WORKER__GROUP", "value": "x"}]},
        ["extraEnv sets JOBSTREAM_WORKER__GROUP", "belong in `config`"],
    ),
    "no-bootstrap-servers": (
        {"config": {"kafka": {"bootstrap_servers": ""}}},
        ["config.kafka.bootstrap_servers is required with config.transport=kafka"],
    ),
    "no-nats-servers": (
        {"config": {"transport": "nats", "nats": {"servers": []}}},
        ["config.nats.servers is required with config.transport=nats"],
    ),
    "sasl-without-password": (
        {"config": {"kafka": KAFKA_SASL}},
        ["config.kafka.security_protocol=SASL_SSL needs a SASL password"],
    ),
    "idempotency-without-url": (
        {"config": {"idempotency": {"backend": "postgres"}}},
        ["config.idempotency.backend=postgres needs its URL"],
    ),
    "file-not-provided": (
        {"secretFiles": {"settings": {"kafka": {"ssl_cafile": "ca.crt"}}}},
        ['secretFiles.settings names the file "ca.crt"', "no such file"],
    ),
    "hpa-without-cpu-request": (
        {
            "autoscaling": {"hpa": {"enabled": True}},
            "worker": {"resources": {"requests": {"cpu": None}}},
        },
        ["autoscaling.hpa.enabled needs worker.resources.requests.cpu"],
    ),
    "keda-min-above-max": (
        {"autoscaling": {"keda": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
        ["autoscaling.keda.minReplicas (5) is larger than autoscaling.keda.maxReplicas (2)"],
    ),
    "bad-app": ({"worker": {"app": "no-colon"}}, ["/worker/app", "does not match pattern"]),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_template_rejects_bad_values(helm: str, case: str) -> None:
    values, messages = BAD_VALUES[case]
    output = rejection(helm, "template", values)
    for message in messages:
        assert message in output


@pytest.mark.parametrize(
    "case", [c for c, (_, messages) in BAD_VALUES.items() if messages[0].startswith("/")]
)
def test_lint_rejects_bad_values(helm: str, case: str) -> None:
    # `helm lint` checks the schema; it only logs a template's `fail` (Helm's lint mode),
    # so the cross-value checks (grace period, KEDA and HPA, ...) show in `helm template`.
    values, messages = BAD_VALUES[case]
    output = rejection(helm, "lint", values)
    for message in messages:
        assert message in output


def test_the_ingress_spool_mounts_its_volume_and_sets_the_spool_path(helm: str) -> None:
    base = {
        "config": {"status": {"backend": "redis"}},
        "secrets": {"values": {"status": {"url": "redis://redis:6379/0"}}},
    }
    claim = {"persistentVolumeClaim": {"claimName": "jobstream-spool"}}
    spool = {"enabled": True, "mountPath": "/spool/", "volume": claim}
    docs = render(helm, {**base, "ingress": {"enabled": True, "spool": spool}})
    ingress = next(c for name, c in containers(docs) if name == INGRESS)
    env, _ = container_env(docs, ingress)
    assert env["JOBSTREAM_SPOOL__PATH"] == "/spool/ingress.db"
    pod = only(docs, "Deployment", INGRESS)["spec"]["template"]["spec"]
    [mount] = [m for m in ingress["volumeMounts"] if m["name"] == "spool"]
    assert mount["mountPath"] == "/spool/"
    [volume] = [v for v in pod["volumes"] if v["name"] == "spool"]
    assert volume == {"name": "spool", **claim}
    worker = next(c for name, c in containers(docs) if name == WORKER)
    assert "JOBSTREAM_SPOOL__PATH" not in container_env(docs, worker)[0]  # workers never spool
    default = render(helm, {**base, "ingress": {"enabled": True, "spool": {"enabled": True}}})
    [own] = [
        v
        for v in only(default, "Deployment", INGRESS)["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "spool"
    ]
    assert own == {"name": "spool", "emptyDir": {"sizeLimit": "1Gi"}}
    off = render(helm, {**base, "ingress": {"enabled": True}})
    ingress_off = next(c for name, c in containers(off) if name == INGRESS)
    assert "JOBSTREAM_SPOOL__PATH" not in container_env(off, ingress_off)[0]
    assert all(
        v["name"] != "spool"
        for v in only(off, "Deployment", INGRESS)["spec"]["template"]["spec"]["volumes"]
    )


def test_the_built_helm_renders_the_chart_without_a_kube_version(helm: str) -> None:
    # Built without Helm's version flags, helm says "v3.21" and assumes Kubernetes 1.20,
    # below the chart's kubeVersion (issue 17): a user's plain `helm template` failed.
    version = subprocess.run(
        [helm, "version", "--template", "{{.Version}}"], capture_output=True, text=True, check=True
    )
    assert re.fullmatch(r"v3\.\d+\.\d+", version.stdout), version.stdout
    result = subprocess.run(
        [helm, "template", RELEASE, str(CHART)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    kinds = {doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc}
    assert {"Deployment", "ConfigMap"} <= kinds, kinds


def test_the_outbox_relay_is_off_by_default_and_publishes_from_its_table_when_on(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    relay = f"{RELEASE}-jobstream-outbox-relay"
    assert all(doc["metadata"]["name"] != relay for doc in rendered["kafka-fixed-defaults"])
    deployment = only(rendered["kafka-outbox-relay"], "Deployment", relay)
    assert deployment["spec"]["replicas"] == 2  # one publishes, one stands by
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["jobstream", "outbox", "relay"]
    env = {e["name"]: e for e in container["env"]}
    assert env["JOBSTREAM_OUTBOX__TABLE"]["value"] == "orders_outbox"
    assert env["JOBSTREAM_OUTBOX__HEALTH_PORT"]["value"] == "8081"
    assert env["JOBSTREAM_OUTBOX__URL"]["valueFrom"] == {
        "secretKeyRef": {"name": "orders-db", "key": "url"}
    }
