"""Liveness and readiness over HTTP, for Kubernetes probes, from progress, not from flags.

`GET /readyz`: 200 while the worker has joined its group (an empty assignment counts: an
idle replica beyond the partition count is ready) and the broker answered within
`health.readiness_silence_s`; 503 before, while the broker is silent, and from the start
of a drain. A source that can say when its broker last answered (`ReportsContact`: a
fetch response, a group heartbeat or a commit on Kafka; a pull answer or an ack
confirmation on NATS) is asked; when it has been silent for a while, the worker asks it to
`probe` (a cheap request), so an idle member still has a signal.

`GET /livez`: 200 unless the worker stopped on a fault, or its fetch loop has not turned,
or the broker has not answered, for `health.liveness_silence_s` (then the kubelet restarts
it). Both bodies say why in one line. A deliberately tiny HTTP/1.1 server: probes need
nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from consumer.core import Settings

Probe = Callable[[], str | None]
"""None when healthy, else why not (the body of the 503 answer)."""


@runtime_checkable
class ReportsContact(Protocol):
    """A source that can say when its broker last answered it (Kafka, NATS)."""

    @property
    def last_contact(self) -> float:
        """`time.monotonic()` of the broker's last answer: a fetch response, a heartbeat,
        a confirmed commit or ack. Only a real answer counts: aiokafka's `getmany` returns
        nothing, without an error, while the broker is away."""
        ...

    async def probe(self) -> None:
        """Ask the broker something cheap; an answer moves `last_contact`. May raise or
        hang: the caller bounds it. Also where a source notices what it lost (a deleted
        JetStream consumer)."""
        ...


@dataclass(frozen=True, slots=True)
class Thresholds:
    """How long a worker may go without progress before it is not ready, not live."""

    ready_s: float
    """`health.readiness_silence_s`, default two thirds of `worker.session_timeout_s`."""
    live_s: float
    """`health.liveness_silence_s`, default `worker.max_poll_interval_s`."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Thresholds:
        health, worker = settings.health, settings.worker
        return cls(
            ready_s=health.readiness_silence_s or worker.session_timeout_s * 2 / 3,
            live_s=health.liveness_silence_s or worker.max_poll_interval_s,
        )

    @property
    def probe_every_s(self) -> float:
        """How often a silent source is probed: four times per readiness window, so one
        lost probe does not make the worker unready."""
        return self.ready_s / 4


class HealthServer:
    def __init__(self, host: str, port: int, *, live: Probe, ready: Probe) -> None:
        self._host, self._port = host, port
        self._routes: dict[str, Callable[[], tuple[int, str]]] = {
            "/livez": lambda: _status(live(), "live"),
            "/readyz": lambda: _status(ready(), "ready"),
        }
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def route(self, path: str, handler: Callable[[], tuple[int, str]]) -> None:
        self._routes[path] = handler

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            handler = self._routes.get(path)
            status, body = handler() if handler else (404, "not found\n")
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}.get(status, "")
            payload = body.encode()
            content_type = "text/plain; version=0.0.4" if path == "/metrics" else "text/plain"
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def _status(problem: str | None, word: str) -> tuple[int, str]:
    return (200, f"{word}\n") if problem is None else (503, f"not {word}: {problem}\n")
