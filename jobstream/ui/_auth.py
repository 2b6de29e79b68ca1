"""Who may see the dashboard, and who may act on it.

With `ingress.auth_token` set, a request is signed in when it carries the token as
`Authorization: Bearer <token>` (scripts, curl) or the session cookie the login form sets
from it (browsers). The cookie holds an HMAC of the token, not the token: `HttpOnly` (no
script reads it), `SameSite=Strict` (no other site's page can make the browser send it, so
a forged cross-site form cannot cancel or replay), `Secure` behind HTTPS, scoped to `/ui`.
Every comparison is constant-time (`hmac.compare_digest`). Changing the token signs every
browser out. Without a token the dashboard is as open as the API.

`ui.read_only` hides the cancel and replay actions and refuses them on the server (403):
hiding a button is not a permission.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import parse_qs

from fastapi import Request
from pydantic import SecretStr

__all__ = ["COOKIE", "Access", "first", "read_form"]

COOKIE = "jobstream_ui"
MAX_FORM_BYTES = 64 * 1024


class Access:
    """The dashboard's sign-in and read-only rules (see the module)."""

    def __init__(self, token: SecretStr | None, *, read_only: bool) -> None:
        self._token = token.get_secret_value().encode() if token is not None else None
        self.read_only = read_only
        self.session = (
            hmac.new(self._token, b"jobstream-ui-session", hashlib.sha256).hexdigest()
            if self._token is not None
            else None
        )

    @property
    def required(self) -> bool:
        return self._token is not None

    def token_matches(self, given: str) -> bool:
        return self._token is not None and hmac.compare_digest(given.encode(), self._token)

    def signed_in(self, request: Request) -> bool:
        if self._token is None or self.session is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token):
            return True
        cookie = request.cookies.get(COOKIE, "")
        return hmac.compare_digest(cookie.encode(), self.session.encode())


async def read_form(request: Request) -> dict[str, list[str]] | None:
    """An `application/x-www-form-urlencoded` body (the dashboard's only forms), or None
    when it is larger than `MAX_FORM_BYTES`."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    return parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)


def first(form: dict[str, list[str]], name: str) -> str | None:
    """The first value of `name` in a parsed form, or None."""
    values = form.get(name)
    return values[0] if values else None
