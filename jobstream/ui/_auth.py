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

An action (cancel, replay) from another origin is refused (403) whether or not a token is
set: `SameSite=Strict` keeps the cookie from other *sites*, but another port or a sibling
subdomain is the same site, and without a token there is no cookie to withhold. A browser
says where a form came from (`Sec-Fetch-Site`, `Origin`); a request with neither (curl, a
script) is not a browser's and is judged by its token alone.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import parse_qs, urlsplit

from fastapi import Request
from pydantic import SecretStr

__all__ = ["COOKIE", "Access", "cross_origin", "first", "read_form"]

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


def cross_origin(request: Request) -> bool:
    """Whether a browser sent `request` from a page of another origin (scheme, host and
    port: `Sec-Fetch-Site` other than `same-origin`/`none`, or an `Origin` whose host and
    port are not this request's `Host`)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return True
    origin = request.headers.get("origin")
    if origin is None:
        return False
    return urlsplit(origin).netloc != request.headers.get("host", "")


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
