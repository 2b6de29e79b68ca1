"""Telemetry providers for a worker, configured by the standard OTEL_* variables.

- **Traces** are on when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`), or,
  when it is unset, when an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT` or
  `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`). Otherwise no SDK provider is created and the
  worker adds no tracing step: telemetry off costs nothing per job. An application that
  installed its own SDK `TracerProvider` before the worker starts keeps it.
- **Metrics**: `OTEL_METRICS_EXPORTER` is a list of `prometheus` (the worker's `/metrics`
  endpoint), `otlp` and `none`. Unset, it means `prometheus`, plus `otlp` when an OTLP
  endpoint is set.
- `OTEL_SDK_DISABLED=true` turns both off. The SDK itself reads the rest: the sampler
  (`OTEL_TRACES_SAMPLER`, `_ARG`), the batch processor (`OTEL_BSP_*`), the exporters
  (`OTEL_EXPORTER_OTLP_*`), the export interval (`OTEL_METRIC_EXPORT_INTERVAL`) and the
  resource (`OTEL_SERVICE_NAME`, default `jobstream-<app>`, `OTEL_RESOURCE_ATTRIBUTES`).

OTLP goes over HTTP/protobuf (`opentelemetry-exporter-otlp-proto-http`, a dependency);
`OTEL_EXPORTER_OTLP_PROTOCOL=grpc` needs `opentelemetry-exporter-otlp-proto-grpc`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import Meter, MeterProvider
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.trace import Tracer, TracerProvider
from prometheus_client import CollectorRegistry, generate_latest

from consumer.core import WorkerError
from producer.tracecontext import recording_provider

_TRACE_EXPORTERS = ("otlp", "console", "none")
_METRIC_EXPORTERS = ("prometheus", "otlp", "none")


@dataclass
class Telemetry:
    """The providers a worker records with, and what to flush when it stops."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    tracing: bool
    """An SDK records spans: the worker adds its tracing step (else none, at no cost)."""
    metrics: bool
    """An SDK records metrics: the worker adds its metrics step and observers."""
    prometheus: CollectorRegistry | None = None
    """The registry `/metrics` renders, when the `prometheus` exporter is on."""
    _closers: list[Callable[[], object]] = field(default_factory=list)

    @classmethod
    def from_global(cls) -> Telemetry:
        """Whatever the application configured globally (nothing: all off)."""
        tracer_provider = trace.get_tracer_provider()
        meter_provider = metrics.get_meter_provider()
        return cls(
            tracer_provider,
            meter_provider,
            recording_provider(tracer_provider),
            _sdk_meter_provider(meter_provider),
        )

    def tracer(self, name: str) -> Tracer:
        return self.tracer_provider.get_tracer(name)

    def meter(self, name: str) -> Meter:
        return self.meter_provider.get_meter(name)

    def prometheus_text(self) -> str:
        """The metrics in the Prometheus text format (empty when that exporter is off)."""
        return "" if self.prometheus is None else generate_latest(self.prometheus).decode()

    def shutdown(self) -> None:
        """Flush and stop the providers created here (blocking: exports what is queued)."""
        while self._closers:
            self._closers.pop()()


def configure(service: str, *, install_global: bool = True) -> Telemetry:
    """Providers as the OTEL_* environment variables ask (the SDK reads some of them too).

    `service` is the default `service.name`. With `install_global` the providers created
    become the global ones (unless the application set its own), so that spans and metrics
    a handler records go to the same place. A bad value raises `WorkerError`.
    """
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return Telemetry(trace.NoOpTracerProvider(), metrics.NoOpMeterProvider(), False, False)
    telemetry = Telemetry.from_global()
    resource: Resource | None = None

    def the_resource() -> Resource:
        nonlocal resource
        if resource is None:
            resource = Resource.create()
            if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
                resource = resource.merge(Resource({SERVICE_NAME: service}))
        return resource

    endpoint = bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    trace_default = ["otlp"] if endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") else []
    trace_exporters = _names(env, "OTEL_TRACES_EXPORTER", _TRACE_EXPORTERS, trace_default)
    if trace_exporters and not telemetry.tracing:
        tracer_provider = SdkTracerProvider(resource=the_resource())
        for name in trace_exporters:
            tracer_provider.add_span_processor(BatchSpanProcessor(_span_exporter(name, env)))
        telemetry.tracer_provider, telemetry.tracing = tracer_provider, True
        telemetry._closers.append(tracer_provider.shutdown)
        if install_global:
            trace.set_tracer_provider(tracer_provider)
    metric_default = ["prometheus"]
    if endpoint or env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        metric_default.append("otlp")
    metric_exporters = _names(env, "OTEL_METRICS_EXPORTER", _METRIC_EXPORTERS, metric_default)
    readers: list[MetricReader] = []
    if "prometheus" in metric_exporters:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader  # noqa: PLC0415

        telemetry.prometheus = CollectorRegistry(auto_describe=True)
        readers.append(PrometheusMetricReader(registry=telemetry.prometheus))
    if "otlp" in metric_exporters:
        readers.append(PeriodicExportingMetricReader(_otlp("metric", env)))
    if readers:
        meter_provider = SdkMeterProvider(metric_readers=readers, resource=the_resource())
        telemetry.meter_provider, telemetry.metrics = meter_provider, True
        telemetry._closers.append(meter_provider.shutdown)
        if install_global and not _sdk_meter_provider(metrics.get_meter_provider()):
            metrics.set_meter_provider(meter_provider)
    return telemetry


def _names(
    env: Mapping[str, str], variable: str, known: tuple[str, ...], default: list[str]
) -> list[str]:
    raw = env.get(variable)
    if raw is None or not raw.strip():
        return default
    names = [name.strip().lower() for name in raw.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        msg = f"{variable}={raw!r}: {unknown[0]!r} is not supported; use {', '.join(known)}"
        raise WorkerError(msg)
    return [name for name in names if name != "none"]


def _span_exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    exporter: SpanExporter = _otlp("trace", env)
    return exporter


def _otlp(signal: str, env: Mapping[str, str]) -> Any:
    """The OTLP exporter of `signal` (`trace`, `metric`) for the configured protocol; it
    reads its endpoint, headers, timeout and compression from the environment itself."""
    variable = f"OTEL_EXPORTER_OTLP_{signal.upper()}S_PROTOCOL"
    protocol = env.get(variable) or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    package = {"http/protobuf": "http", "grpc": "grpc"}.get(protocol.strip().lower())
    if package is None:
        msg = f"OTLP protocol {protocol!r} is not supported: use http/protobuf or grpc"
        raise WorkerError(msg)
    module_name = f"opentelemetry.exporter.otlp.proto.{package}.{signal}_exporter"
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        msg = (
            f"OTLP over {protocol} needs opentelemetry-exporter-otlp-proto-{package} "
            f"({error}): install it, or set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf"
        )
        raise WorkerError(msg) from error
    exporter_class = module.OTLPSpanExporter if signal == "trace" else module.OTLPMetricExporter
    return exporter_class()


def _sdk_meter_provider(provider: MeterProvider) -> bool:
    return not isinstance(provider, metrics.NoOpMeterProvider) and (
        type(provider).__name__ != "_ProxyMeterProvider"
    )
