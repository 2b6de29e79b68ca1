"""The chart's security parts (docs/security.md): NetworkPolicies (off by default), secrets
only from Secrets (files included), a read-only root filesystem."""

from __future__ import annotations

from typing import Any

import kubernetes_validate

from tests.helm.test_chart import KUBE_VERSION, container_env, containers, helm, render

__all__ = ["helm"]  # the session fixture, shared with test_chart

SECURED: dict[str, Any] = {
    "config": {
        "kafka": {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "jobs",
        },
        "idempotency": {"backend": "redis"},
        "status": {"backend": "redis"},
        "ingress": {"cors_origins": ["https://app.example.com"]},
    },
    "secrets": {
        "values": {
            "idempotency": {"url": "rediss://redis:6380/0"},
            "status": {"url": "rediss://redis:6380/1"},
        }
    },
    "secretFiles": {
        "files": {"ca.pem": "x", "kafka": "p", "redis": "r", "token": "t"},
        "settings": {
            "kafka": {"ssl_cafile": "ca.pem", "sasl_password_file": "kafka"},
            "nats": {"password_file": "ignored-on-kafka"},
            "idempotency": {"password_file": "redis"},
            "status": {"password_file": "redis"},
            "ingress": {"auth_token_file": "token"},
        },
    },
    "ingress": {"enabled": True},
    "networkPolicy": {
        "enabled": True,
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}],
    },
}


def test_no_network_policy_by_default(helm: str) -> None:
    assert [d for d in render(helm, {}) if d["kind"] == "NetworkPolicy"] == []


def test_network_policies_secret_files_and_read_only_root(helm: str) -> None:
    values = dict(SECURED)
    values["secretFiles"] = {
        **SECURED["secretFiles"],
        "files": {**SECURED["secretFiles"]["files"], "ignored-on-kafka": "n"},
    }
    docs = render(helm, values)
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    for doc in policies.values():
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    worker = next(p for name, p in policies.items() if name.endswith("-worker"))
    ingress = next(p for name, p in policies.items() if name.endswith("-ingress"))
    assert len(policies) == 2
    assert worker["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert worker["spec"]["ingress"] == [
        {
            "ports": [{"port": "health", "protocol": "TCP"}],
            "from": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
        }
    ]
    assert ingress["spec"]["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]}]
    egress = worker["spec"]["egress"]
    assert egress[0] == {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}
    assert {p["port"] for p in egress[1]["ports"]} == {53}
    assert worker["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    mount = "/etc/jobstream/secrets"
    for _, container in containers(docs):
        env, _ = container_env(docs, container)
        assert env["JOBSTREAM_KAFKA__SASL_PASSWORD_FILE"] == f"{mount}/kafka"
        assert env["JOBSTREAM_STATUS__PASSWORD_FILE"] == f"{mount}/redis"
        assert env["JOBSTREAM_IDEMPOTENCY__PASSWORD_FILE"] == f"{mount}/redis"
        assert env["JOBSTREAM_INGRESS__AUTH_TOKEN_FILE"] == f"{mount}/token"
        assert "JOBSTREAM_NATS__PASSWORD_FILE" not in env  # the other transport's section
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        # No secret value in the pod spec itself: only references to Secrets.
        plain = [e for e in container.get("env", []) if not e["name"].endswith("_FILE")]
        assert [e["name"] for e in plain if "PASSWORD" in e["name"] or "TOKEN" in e["name"]] == []
    secret_files = next(
        d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-files")
    )
    assert sorted(secret_files["data"]) == sorted(values["secretFiles"]["files"])
