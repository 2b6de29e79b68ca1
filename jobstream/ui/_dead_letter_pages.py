"""The dashboard's dead-letter pages: per destination, one dead letter, and replay (a dry
run first, then the real one), through `jobstream._dlq`, the code `jobstream dlq` runs."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import Response

from consumer.core import DeadLetterFilter, DeadLetterRecord
from jobstream import _dlq
from jobstream.ui._auth import first, read_form
from schemas import default_registry

if TYPE_CHECKING:
    from jobstream.ui._pages import Dashboard

__all__ = ["DeadLetterPages"]

log = logging.getLogger("jobstream.ui")
REPLAY_RATE_PER_S = 50.0


class DeadLetterPages:
    def __init__(self, dash: Dashboard) -> None:
        self.dash = dash

    def _destinations(self, chosen: str | None) -> list[str]:
        """Every known dead-letter destination, or the one chosen; a destination that is
        not one of them matches nothing (never "all of them": a replay filter must not
        widen)."""
        known = _dlq.default_destinations(self.dash.settings)
        if not chosen:
            return known
        return [chosen] if chosen in known else []

    async def _find(
        self, destinations: list[str], where: DeadLetterFilter
    ) -> list[DeadLetterRecord]:
        if not destinations:
            return []
        return await _dlq.find(self.dash.settings, destinations, where)

    async def dead_letters(self, request: Request) -> Response:
        if (refused := self.dash.refused(request)) is not None:
            return refused
        params = request.query_params
        destination = params.get("destination") or None
        where = _where(params.get("type"), params.get("reason"), params.get("job"))
        records = await self._find(self._destinations(destination), where)
        limit = self.dash.config.max_dead_letters
        shown = list(reversed(records))[:limit]  # the newest first
        by_destination: dict[str, list[DeadLetterRecord]] = {}
        for record in shown:
            by_destination.setdefault(record.topic, []).append(record)  # NATS: the subject
        return self.dash.render(
            request,
            "dead_letters.html",
            groups=sorted(by_destination.items()),
            total=len(records),
            limit=limit,
            destinations=_dlq.default_destinations(self.dash.settings),
            destination=destination or "",
            job_type=params.get("type") or "",
            reason=params.get("reason") or "",
            job=params.get("job") or "",
            types=default_registry.job_types(),
        )

    async def dead_letter(self, request: Request) -> Response:
        if (refused := self.dash.refused(request)) is not None:
            return refused
        wanted = request.query_params.get("id") or ""
        found = await self._find(self._destinations(None), _where(None, None, wanted))
        if not wanted or not found:
            return self.dash.render(
                request, "message.html", 404, title="no such dead letter", message=repr(wanted)
            )
        detail = _dlq.full(found[-1])
        body = json.dumps(detail.pop("body"), indent=2, ensure_ascii=False)
        return self.dash.render(
            request, "dead_letter.html", record=found[-1], detail=detail, body=body
        )

    async def replay(self, request: Request) -> Response:
        if (refused := self.dash.refused_action(request)) is not None:
            return refused
        form = await read_form(request)
        if form is None:
            return Response("form too large\n", 413)
        ids = [value for value in form.get("id", []) if value][: self.dash.config.max_dead_letters]
        job_type, reason = first(form, "type"), first(form, "reason")
        destination = first(form, "destination")
        if not ids and not (job_type or reason or destination):
            return self.dash.render(
                request,
                "message.html",
                400,
                title="nothing to replay",
                message="Name dead letters, or filter them by destination, type or reason.",
            )
        dry_run = first(form, "confirm") != "yes"
        where = _where(job_type, reason, None, ids)
        records = (await self._find(self._destinations(destination), where))[
            : self.dash.config.max_dead_letters
        ]
        results = await _dlq.replay(
            self.dash.settings, records, force=False, dry_run=dry_run, rate=REPLAY_RATE_PER_S
        )
        log.info(
            "dashboard replay (%s): %d dead letters", "dry run" if dry_run else "real", len(results)
        )
        return self.dash.render(
            request,
            "replay.html",
            results=results,
            dry_run=dry_run,
            ids=ids,
            job_type=job_type or "",
            reason=reason or "",
            destination=destination or "",
            replayable=sum(result.status == "would-replay" for result in results),
        )


def _where(
    job_type: str | None, reason: str | None, job: str | None, ids: list[str] | None = None
) -> DeadLetterFilter:
    wanted = set(ids or ())
    if job:
        wanted.add(job)
    return DeadLetterFilter(job_type or None, reason or None, None, None, frozenset(wanted))
