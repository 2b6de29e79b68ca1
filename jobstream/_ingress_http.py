"""What every answer of the ingress carries (docs/security.md, "Ingress").

- A request id: the caller's `X-Request-Id` when it is a plain token (at most 128 of
  `A-Z a-z 0-9 . _ -`), else a new one; sent back in `X-Request-Id`, and on every line the
  `jobstream.ingress` loggers write while the request runs, and on one line per `/v1`
  request (`request_id`, `method`, `path`, `status`, `duration_ms`; never a header or a
  body, so never a token).
- Security headers on HTML pages: `X-Content-Type-Options: nosniff`, `X-Frame-Options:
  DENY`, `Referrer-Policy: same-origin`, and on the dashboard (`/ui`) a Content Security
  Policy that allows only its own scripts (`/docs` loads Swagger UI from its CDN, so it gets
  no policy).
- No CORS unless `ingress.cors_origins` names the origins that may call the API from a
  browser (Starlette's `CORSMiddleware`, added by `create_app`).
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import Response

__all__ = ["REQUEST_ID", "RequestIds", "secure_html"]

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "jobstream_request_id", default=None
)
"""The id of the request being answered (None outside one)."""
_PLAIN_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_HTML_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # `same-origin`, not `no-referrer`: with `no-referrer` a browser sends `Origin: null` on
    # the dashboard's own form posts, which `cross_origin` then refuses.
    "Referrer-Policy": "same-origin",
}
_UI_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
log = logging.getLogger("jobstream.ingress")


class _WithRequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        if request_id is not None:
            job = getattr(record, "job", None)
            record.job = (
                {**job, "request_id": request_id}
                if isinstance(job, dict)
                else {"request_id": request_id}
            )
        return True


class RequestIds:
    """The middleware that gives each request its id and its log line (see the module)."""

    def __init__(self) -> None:
        log.addFilter(_WithRequestId())

    async def __call__(self, request: Request, call_next: Any) -> Response:
        given = request.headers.get("x-request-id", "")
        request_id = given if _PLAIN_ID.fullmatch(given) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        started = time.monotonic()
        try:
            response: Response = await call_next(request)
            response.headers["X-Request-Id"] = request_id
            secure_html(request, response)
            if request.url.path.startswith("/v1/"):
                log.info(
                    "%s %s %d",
                    request.method,
                    request.url.path,
                    response.status_code,
                    extra={
                        "job": {
                            "method": request.method,
                            "path": request.url.path,
                            "status": response.status_code,
                            "duration_ms": round((time.monotonic() - started) * 1000, 1),
                        }
                    },
                )
            return response
        finally:
            REQUEST_ID.reset(token)


def secure_html(request: Request, response: Response) -> None:
    """Add the HTML pages' security headers to `response` if it is an HTML page."""
    if not response.headers.get("content-type", "").startswith("text/html"):
        return
    for name, value in _HTML_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.url.path.startswith("/ui"):
        response.headers.setdefault("Content-Security-Policy", _UI_POLICY)
