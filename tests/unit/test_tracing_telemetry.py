"""Telemetry comes from the standard OTEL_* variables; with none set, tracing is off (no
SDK provider, no tracing step) and metrics go to `/metrics` only. Bad values are one
clear error."""

from __future__ import annotations

import os

import pytest
from opentelemetry.sdk.trace import TracerProvider

from consumer import WorkerError
from consumer.telemetry import Telemetry
from consumer.telemetry import configure as configure_from_env


@pytest.fixture(autouse=True)
def no_otel_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch):
    def with_env(service: str, *, environ: dict[str, str], install_global: bool) -> Telemetry:
        for name, value in environ.items():
            monkeypatch.setenv(name, value)
        return configure_from_env(service, install_global=install_global)

    return with_env


def test_nothing_set_means_no_tracing_and_prometheus_metrics(configure) -> None:
    telemetry = configure("jobstream-app", environ={}, install_global=False)
    try:
        assert telemetry.tracing is False
        assert telemetry.metrics is True
        assert telemetry.prometheus is not None
        counter = telemetry.meter("t").create_counter("jobstream.test.things", "{thing}")
        counter.add(3, {"kind": "a"})
        text = telemetry.prometheus_text()
        assert 'jobstream_test_things_total{kind="a"' in text
        assert 'service_name="jobstream-app"' in text  # the target_info resource
    finally:
        telemetry.shutdown()


def test_an_otlp_endpoint_turns_traces_and_otlp_metrics_on(configure) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_SERVICE_NAME": "mail"}
    telemetry = configure("jobstream-app", environ=env, install_global=False)
    try:
        assert telemetry.tracing is True
        provider = telemetry.tracer_provider
        assert isinstance(provider, TracerProvider)
        assert provider.resource.attributes["service.name"] == "mail"
        assert telemetry.prometheus is not None
    finally:
        telemetry.shutdown()


@pytest.mark.parametrize(
    ("env", "tracing", "metrics"),
    [
        ({"OTEL_TRACES_EXPORTER": "console"}, True, True),
        (
            {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:1"},
            False,
            True,
        ),
        ({"OTEL_METRICS_EXPORTER": "none"}, False, False),
        ({"OTEL_METRICS_EXPORTER": "otlp"}, False, True),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False, False),
    ],
)
def test_the_exporter_variables_decide(
    configure, env: dict[str, str], tracing: bool, metrics: bool
) -> None:
    telemetry = configure("jobstream-app", environ=env, install_global=False)
    try:
        assert (telemetry.tracing, telemetry.metrics) == (tracing, metrics)
    finally:
        telemetry.shutdown()


def test_metrics_exporter_none_serves_no_metrics_text(configure) -> None:
    telemetry = configure("app", environ={"OTEL_METRICS_EXPORTER": "none"}, install_global=False)
    assert telemetry.prometheus is None
    assert telemetry.prometheus_text() == ""


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin': 'zipkin' is not"),
        ({"OTEL_METRICS_EXPORTER": "prometheus,statsd"}, "'statsd' is not supported"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "OTLP protocol 'http/json' is not supported: use http/protobuf or grpc",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"},
            "needs opentelemetry-exporter-otlp-proto-grpc",
        ),
    ],
)
def test_a_bad_value_is_one_clear_error(configure, env: dict[str, str], message: str) -> None:
    with pytest.raises(WorkerError, match=message.replace("(", r"\(")):
        configure("app", environ=env, install_global=False)
