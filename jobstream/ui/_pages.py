"""The dashboard's pages: jobs, one job, live view (dead letters: `_dead_letter_pages.py`).

Every page answers "what happened to job X?" from what already exists: job states and
attempt histories from the status store, dead letters and their replay from the code
`jobstream dlq` runs (`jobstream._dlq`), cancellation from `consumer.stores.cancel_job`
(the API's and the CLI's). Pages are rendered on the server by Jinja2 with autoescaping on:
job bodies, errors, headers and keys are untrusted and are shown as text, never as markup.
Forms work without JavaScript (POST, then a 303 back); htmx, when served, refreshes the
live view in place. Every list is bounded (`ui.page_size`, `ui.max_dead_letters`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from consumer import Settings
from consumer.stores import FINAL_STATES, JobQuery, JobState, StatusStore, cancel_job
from jobstream.ui._auth import COOKIE, Access, cross_origin, first, read_form
from jobstream.ui._dead_letter_pages import DeadLetterPages
from jobstream.ui._live import OUTCOMES, live_view
from schemas import default_registry

__all__ = ["Dashboard"]

log = logging.getLogger("jobstream.ui")
TEMPLATES = Path(__file__).parent / "templates"
DEFAULT_HTMX = Path(".cache/htmx/htmx-2.0.11.min.js")


class Dashboard:
    """The `/ui` routes over one status store and the settings' broker."""

    def __init__(self, settings: Settings, status: StatusStore) -> None:
        self.settings = settings
        self.config = settings.ui
        self.status = status
        self.access = Access(settings.ingress.auth_token, read_only=settings.ui.read_only)
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES),
            autoescape=True,  # every value from a record is text, never markup
            undefined=jinja2.StrictUndefined,
        )
        self.templates.filters["when"] = _when
        self.htmx = _read_htmx(self.config.htmx_file)
        self.dead = DeadLetterPages(self)

    def router(self) -> APIRouter:
        router = APIRouter(prefix="/ui", include_in_schema=False)
        get, post = router.get, router.post
        get("")(self.home)
        get("/")(self.home)
        get("/login")(self.login_page)
        post("/login")(self.login)
        post("/logout")(self.logout)
        get("/static/htmx.min.js")(self.htmx_file)
        get("/jobs")(self.jobs)
        get("/jobs/{job_id}")(self.job)
        post("/jobs/{job_id}/cancel")(self.cancel)
        get("/dead-letters")(self.dead.dead_letters)
        get("/dead-letter")(self.dead.dead_letter)
        post("/dead-letters/replay")(self.dead.replay)
        get("/live")(self.live)
        get("/live/panel")(self.live_panel)
        return router

    # --- rendering and sign-in -----------------------------------------------------------

    def render(
        self, request: Request, name: str, status_code: int = 200, **values: Any
    ) -> Response:
        page = self.templates.get_template(name).render(
            request=request,
            read_only=self.access.read_only,
            signed_in_required=self.access.required,
            htmx=self.htmx is not None,
            transport=self.settings.transport,
            **values,
        )
        headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
        return HTMLResponse(page, status_code, headers=headers)

    def refused(self, request: Request) -> Response | None:
        """The answer to a request that is not signed in, else None."""
        if self.access.signed_in(request):
            return None
        if request.method == "GET" and "hx-request" not in request.headers:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/ui/login?next={quote(target)}", 303)
        return Response("sign in first\n", 401, headers={"HX-Redirect": "/ui/login"})

    def refused_action(self, request: Request) -> Response | None:
        refused = self.refused(request)
        if refused is not None:
            return refused
        if cross_origin(request):
            return self.render(
                request,
                "message.html",
                403,
                title="refused",
                message="Cancel and replay are taken only from the dashboard's own pages.",
            )
        if self.access.read_only:
            return self.render(
                request,
                "message.html",
                403,
                title="read-only",
                message="This dashboard is read-only (ui.read_only): cancel and replay are off.",
            )
        return None

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/ui/jobs", 303)

    async def login_page(self, request: Request) -> Response:
        return self.render(request, "login.html", next=_local(request.query_params.get("next")))

    async def login(self, request: Request) -> Response:
        form = await read_form(request) or {}
        target = _local(first(form, "next"))
        if not self.access.token_matches(first(form, "token") or ""):
            return self.render(request, "login.html", 401, next=target, error="wrong token")
        response = RedirectResponse(target, 303)
        response.set_cookie(
            COOKIE,
            self.access.session or "",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/ui",
        )
        return response

    async def logout(self, request: Request) -> Response:
        response = RedirectResponse("/ui/login", 303)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    async def htmx_file(self, request: Request) -> Response:
        if self.htmx is None:
            return Response("htmx is not installed here: run `make htmx`\n", 404)
        return Response(
            self.htmx,
            media_type="text/javascript",
            headers={"Cache-Control": "public, max-age=86400"},
        )

    # --- jobs ----------------------------------------------------------------------------

    async def jobs(self, request: Request) -> Response:
        if (refused := self.refused(request)) is not None:
            return refused
        params = request.query_params
        wanted = (params.get("q") or "").strip()
        if wanted and await self.status.get(wanted) is not None:
            return RedirectResponse(f"/ui/jobs/{quote(wanted, safe='')}", 303)
        state = params.get("state") or None
        if state is not None and state not in set(JobState):
            known = ", ".join(s.value for s in JobState)
            return self.render(
                request,
                "message.html",
                400,
                title="no such state",
                message=f"{state!r}: one of {known}",
            )
        query = JobQuery(
            state=JobState(state) if state is not None else None,
            job_type=params.get("type") or None,
            key=params.get("key") or None,
            limit=self.config.page_size,
            cursor=_int(params.get("cursor")),
        )
        page = await self.status.list_jobs(query)
        following = None
        if page.next_cursor is not None:
            kept = {k: v for k, v in params.items() if k not in ("cursor", "q") and v}
            following = "/ui/jobs?" + urlencode({**kept, "cursor": page.next_cursor})
        return self.render(
            request,
            "jobs.html",
            page=page,
            query=query,
            states=list(JobState),
            types=default_registry.job_types(),
            missing=wanted or None,
            following=following,
        )

    async def job(self, request: Request, job_id: str) -> Response:
        if (refused := self.refused(request)) is not None:
            return refused
        found = await self.status.get(job_id)
        if found is None:
            return self.render(
                request,
                "message.html",
                404,
                title="no such job",
                message=f"No job {job_id!r}: unknown, or expired after status.retention_s.",
            )
        jaeger = self.config.jaeger_url
        trace_url = (
            f"{jaeger.rstrip('/')}/trace/{found.trace_id}" if jaeger and found.trace_id else None
        )
        return self.render(
            request,
            "job.html",
            job=found,
            final=found.state in FINAL_STATES,
            trace_url=trace_url,
            notice=request.query_params.get("notice"),
        )

    async def cancel(self, request: Request, job_id: str) -> Response:
        if (refused := self.refused_action(request)) is not None:
            return refused
        asked, current = await cancel_job(self.status, job_id)
        notice = (
            f"cancel requested ({current.state.value})"
            if asked
            else f"already {current.state.value}: nothing to cancel"
        )
        target = f"/ui/jobs/{quote(job_id, safe='')}?{urlencode({'notice': notice})}"
        return RedirectResponse(target, 303)

    # --- live ----------------------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        if (refused := self.refused(request)) is not None:
            return refused
        return self.render(
            request, "live.html", view=await live_view(self.status), outcomes=OUTCOMES
        )

    async def live_panel(self, request: Request) -> Response:
        if (refused := self.refused(request)) is not None:
            return refused
        view = await live_view(self.status)
        return self.render(request, "_live_panel.html", view=view, outcomes=OUTCOMES)


def _read_htmx(configured: str | None) -> bytes | None:
    path = Path(configured) if configured else DEFAULT_HTMX
    try:
        return path.read_bytes()
    except OSError:
        log.warning("no htmx at %s (run `make htmx`): the live view will not refresh itself", path)
        return None


def _int(value: str | None) -> int:
    """A small non-negative integer from a query parameter (a cursor), else 0: at most 9
    ASCII digits, so a huge or non-ASCII number never reaches the store."""
    if value and len(value) <= 9 and value.isascii() and value.isdigit():
        return int(value)
    return 0


def _local(target: str | None) -> str:
    """A redirect target inside the dashboard (never another site: no open redirect)."""
    if target and target.startswith("/ui") and not target.startswith("//"):
        return target
    return "/ui/jobs"


def _when(value: Any) -> str:
    if value is None:
        return "-"
    return str(value.isoformat(sep=" ", timespec="milliseconds"))
