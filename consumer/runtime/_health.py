"""Liveness and readiness over HTTP, for Kubernetes probes.

`GET /livez`: 200 while the worker's loops run (a dead loop means a restart is needed).
`GET /readyz`: 200 once the worker joined its group and got an assignment (an empty one
counts: an idle replica beyond the partition count is ready), 503 before and while it
drains. A deliberately tiny HTTP/1.1 server: probes need nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

Probe = Callable[[], bool]


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


def _status(ok: bool, word: str) -> tuple[int, str]:
    return (200, f"{word}\n") if ok else (503, f"not {word}\n")
