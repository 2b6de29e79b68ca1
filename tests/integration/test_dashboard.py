"""The on-call dashboard in a real browser: Debian's chromium (`scripts/chromium.sh`, never
`playwright install`) driven by Playwright, against the ingress serving `/ui`, a worker,
Kafka and Redis. Each page visited is saved to `.run/screenshots/` (docs/dashboard.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import nats
import pytest
import uvicorn
from playwright.async_api import Browser, Page, async_playwright

from consumer import Settings, backend_for
from consumer._run import open_status
from consumer.stores import JobState, StatusStore
from jobstream._ingress import create_app
from tests.apps.dashboard import app
from tests.conftest import KAFKA_BOOTSTRAP, NATS_URL, REDIS_URL
from tests.support import ROOT, free_port, routed_topic, running_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TOKEN = "dash-token-1"
SCREENSHOTS = ROOT / ".run" / "screenshots"
XSS = "<script>window.__pwned = 1</script><img src=x onerror='window.__pwned = 2'>"


def _script(*args: str) -> str:
    result = subprocess.run(
        [str(ROOT / "scripts" / "chromium.sh"), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return result.stdout.strip()


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Debian's chromium (unpacked once into .cache) and its libraries' path; htmx fetched."""
    htmx = subprocess.run(
        [str(ROOT / "scripts" / "htmx.sh")], capture_output=True, text=True, check=True
    )
    assert Path(htmx.stdout.strip()).is_file()
    return _script(), _script("--library-path")


@pytest.fixture
async def browser(chromium: tuple[str, str]) -> AsyncIterator[Browser]:
    executable, libraries = chromium
    env = {**os.environ, "LD_LIBRARY_PATH": libraries}
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable, env=env)
        try:
            yield launched
        finally:
            await launched.close()


def make_settings(topic: str, group: str, monkeypatch, **ui: object) -> Settings:
    monkeypatch.setenv("JOBSTREAM_ROUTING__ROUTES", json.dumps({"test.dash": topic}))
    return Settings(
        kafka={"bootstrap_servers": KAFKA_BOOTSTRAP},
        worker={"group": group, "commit_interval_s": 0.2},
        retry={
            "tiers_s": [0.3],
            "policy": {"max_attempts": 2, "initial_delay_s": 0.3, "jitter": 0},
        },
        status={
            "backend": "redis",
            "url": REDIS_URL,
            "namespace": f"d{uuid.uuid4().hex[:8]}",
            "cancel_poll_s": 0.1,
        },
        ingress={"auth_token": TOKEN},
        ui={"jaeger_url": "http://127.0.0.1:16686", **ui},
    )


@contextlib.asynccontextmanager
async def nats_settings(group: str, **ui: object) -> AsyncIterator[Settings]:
    """Settings for a private stream (and its dead-letter stream and ledger), provisioned
    as `jobstream topics ensure` does, deleted afterwards."""
    stream = f"DASH_{uuid.uuid4().hex[:8]}".upper()
    prefix = stream.lower()
    settings = Settings(
        transport="nats",
        nats={"servers": [NATS_URL]},
        routing={"stream": stream, "subject_prefix": f"{prefix}."},
        worker={"group": group},
        retry={"policy": {"max_attempts": 2, "initial_delay_s": 0.3, "jitter": 0}},
        status={
            "backend": "redis",
            "url": REDIS_URL,
            "namespace": f"d{uuid.uuid4().hex[:8]}",
            "cancel_poll_s": 0.1,
        },
        ingress={"auth_token": TOKEN},
        ui={"jaeger_url": "http://127.0.0.1:16686", **ui},
    )
    await backend_for("nats").provision(settings, ["test.dash"])
    try:
        yield settings
    finally:
        client = await nats.connect(NATS_URL)
        try:
            js = client.jetstream()
            for name in (stream, f"{stream}_DLQ"):
                with contextlib.suppress(Exception):
                    await js.delete_stream(name)
        finally:
            await client.close()


@contextlib.asynccontextmanager
async def bus_settings(
    transport: str, new_topic, group: str, monkeypatch
) -> AsyncIterator[Settings]:
    if transport == "nats":
        async with nats_settings(group) as settings:
            yield settings
    else:
        yield make_settings(await routed_topic(new_topic), group, monkeypatch)


@contextlib.asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[tuple[str, StatusStore]]:
    """The ingress (API and dashboard) on a free port, in this event loop."""
    status = await open_status(settings)
    assert status is not None
    port = free_port()
    config = uvicorn.Config(
        create_app(settings, status), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.05)
        assert server.started, "the ingress did not start"
        yield f"http://127.0.0.1:{port}", status
    finally:
        server.should_exit = True
        await task
        await status.close()


async def submit(base: str, body: dict[str, object]) -> str:
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        response = await http.post(
            "/v1/jobs/test.dash", json=body, headers={"Authorization": f"Bearer {TOKEN}"}
        )
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


async def state_in_store(status: StatusStore, job_id: str, wanted: str, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        found = await status.get(job_id)
        seen = found.state.value if found else None
        if seen == wanted:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached {wanted} (last: {seen})")


async def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


async def sign_in(page: Page, base: str, target: str, token: str = TOKEN) -> None:
    await page.goto(base + target)
    assert "/ui/login" in page.url
    await page.fill("input[name=token]", token)
    await page.click("button[type=submit]")


async def page_state(page: Page, url: str, wanted: str, timeout_s: float = 30) -> None:
    """Reload `url` until its state cell says `wanted` (bounded)."""
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        await page.goto(url)
        seen = await page.inner_text("#state")
        if seen == wanted:
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"{url} never showed {wanted} (last: {seen})")


async def assert_inert(page: Page) -> None:
    """Nothing from a record ran: no flag set, no script element outside the page's own."""
    assert await page.evaluate("window.__pwned") is None
    assert await page.locator("main script, main img").count() == 0


@pytest.mark.parametrize("transport", ["kafka", "nats"])
async def test_dead_letter_found_dry_run_then_replayed_and_succeeds(
    browser: Browser, transport: str, new_topic, group_id, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("JOBSTREAM_TEST_BROKEN", str(tmp_path))
    name = f"scan-{uuid.uuid4().hex[:6]}"
    cause = tmp_path / name
    cause.touch()  # the cause of the failure, fixed below
    async with (
        bus_settings(transport, new_topic, group_id, monkeypatch) as settings,
        served(settings) as (base, status),
        running_worker(app, settings),
    ):
        job_id = await submit(base, {"name": name, "note": XSS})
        await state_in_store(status, job_id, "dead_lettered")
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"  # tracing is off here: give it one
        await status.record(job_id, JobState.DEAD_LETTERED, trace_id=trace_id)
        page = await browser.new_page()

        await page.goto(base + "/ui/jobs")
        await shot(page, "login")
        await sign_in(page, base, "/ui/jobs")
        assert page.url.endswith("/ui/jobs")
        await page.fill("input[name=q]", job_id)
        await page.click("form[action='/ui/jobs'] button")  # search by id
        assert page.url.endswith(f"/ui/jobs/{job_id}")
        assert await page.inner_text("#state") == "dead_lettered"
        attempts = page.locator("#attempts tr")
        assert await attempts.count() == 3  # the header and attempts 1 and 2
        assert XSS in await page.inner_text("#last-error")  # shown as text
        await assert_inert(page)
        link = await page.get_attribute("#trace-link", "href")
        assert link == f"http://127.0.0.1:16686/trace/{trace_id}"
        await shot(page, f"job-dead-lettered-{transport}")

        await page.click("#dead-letter-link")
        rows = page.locator("table.dead-letters tr")
        assert await rows.count() == 2  # the header and this job's dead letter
        assert "<script>" in await rows.nth(1).inner_text()  # its error, as text
        await assert_inert(page)
        await shot(page, f"dead-letters-{transport}")
        await rows.nth(1).locator("a").first.click()
        assert XSS in await page.inner_text("#body")
        assert XSS in await page.inner_text("#summary")
        assert "retries-exhausted" in await page.inner_text("#summary")
        id_header = "ce_id" if transport == "kafka" else "ce-id"
        assert f"{id_header}\t{job_id}" in await page.inner_text("#headers")
        await assert_inert(page)
        await shot(page, f"dead-letter-{transport}")

        cause.unlink()  # fix the cause, then replay
        await page.click("#dry-run")
        assert await page.locator(".replay-status").all_inner_texts() == ["would-replay"]
        await shot(page, f"replay-dry-run-{transport}")
        assert (await status.get(job_id)).state is JobState.DEAD_LETTERED  # type: ignore[union-attr]
        await page.click("#replay")
        assert await page.locator(".replay-status").all_inner_texts() == ["replayed"]
        await page_state(page, f"{base}/ui/jobs/{job_id}", "succeeded")
        outcomes = await page.locator("#attempts tr td:nth-child(5)").all_inner_texts()
        assert outcomes == ["retrying", "dead_lettered", "succeeded"]
        await shot(page, f"job-replayed-{transport}")

        # A second dry run finds it replayed already: a replay happens once.
        await page.goto(f"{base}/ui/dead-letters?job={job_id}")
        await page.click("#dry-run-filtered")
        assert await page.locator(".replay-status").all_inner_texts() == ["already-replayed"]
        assert await page.locator("#replay").count() == 0


@pytest.mark.parametrize("transport", ["kafka", "nats"])
async def test_cancel_a_running_job_while_the_live_view_updates(
    browser: Browser, transport: str, new_topic, group_id, monkeypatch
) -> None:
    async with (
        bus_settings(transport, new_topic, group_id, monkeypatch) as settings,
        served(settings) as (base, status),
        running_worker(app, settings),
    ):
        page = await browser.new_page()
        await sign_in(page, base, "/ui/live")
        assert page.url.endswith("/ui/live")
        await page.evaluate("window.__loaded_once = true")
        job_id = await submit(base, {"name": "slow", "wait": True})
        await state_in_store(status, job_id, "running")
        # htmx polls the panel: the running job and a worker's report appear without a reload.
        await page.wait_for_function(
            "(id) => document.querySelector('#running')?.innerText.includes(id)",
            arg=job_id,
            timeout=15_000,
        )
        await page.wait_for_function(
            "document.querySelector('#in-flight')?.innerText === '1'", timeout=15_000
        )
        assert await page.evaluate("window.__loaded_once") is True
        rows = [
            row.split("\t")[:3] for row in (await page.locator("#lag tr").all_inner_texts())[1:]
        ]
        if transport == "kafka":  # per partition of the topic: the running job is unsettled
            topic = settings.routing.routes["test.dash"]
            assert sorted((d, p) for d, p, _ in rows) == [(topic, "0"), (topic, "1"), (topic, "2")]
            assert sum(int(m) for _, _, m in rows) == 1
        else:  # per consumer of the stream
            assert rows == [[settings.routing.stream, group_id, "1"]]
        await shot(page, f"live-{transport}")

        await page.click(f"#running a:text('{job_id}')")
        assert await page.inner_text("#state") == "running"
        await page.click("#cancel")
        assert "cancel requested" in await page.inner_text("#notice")
        await page_state(page, f"{base}/ui/jobs/{job_id}", "cancelled")
        assert await page.locator("#cancel").count() == 0  # a final state: nothing to cancel
        await shot(page, f"job-cancelled-{transport}")
        await page.goto(f"{base}/ui/jobs?state=cancelled")
        assert job_id in await page.inner_text("#jobs")
        await shot(page, f"jobs-{transport}")


async def test_wrong_token_refused_and_read_only_hides_and_refuses_actions(
    browser: Browser, new_topic, group_id, monkeypatch
) -> None:
    topic = await routed_topic(new_topic)
    settings = make_settings(topic, group_id, monkeypatch, read_only=True)
    async with served(settings) as (base, status):
        job_id = f"ro-{uuid.uuid4().hex[:8]}"
        await status.record(job_id, JobState.RUNNING, job_type="test.dash", attempts=1)
        page = await browser.new_page()

        await sign_in(page, base, f"/ui/jobs/{job_id}", token="not-the-token")
        assert await page.inner_text("#login-error") == "wrong token"
        await shot(page, "login-refused")
        await page.goto(f"{base}/ui/jobs/{job_id}")
        assert "/ui/login" in page.url  # still signed out
        refused = await page.request.post(f"{base}/ui/jobs/{job_id}/cancel")
        assert refused.status == 401

        await page.fill("input[name=token]", TOKEN)
        await page.click("button[type=submit]")
        assert page.url.endswith(f"/ui/jobs/{job_id}")
        assert await page.locator("#cancel").count() == 0  # hidden
        await shot(page, "job-read-only")
        cancel = await page.request.post(f"{base}/ui/jobs/{job_id}/cancel")
        assert cancel.status == 403  # and refused, signed in or not
        replay = await page.request.post(
            f"{base}/ui/dead-letters/replay", form={"id": "x:0:0", "confirm": "yes"}
        )
        assert replay.status == 403
        assert (await status.get(job_id)).state is JobState.RUNNING  # type: ignore[union-attr]
        assert await status.cancelled([job_id]) == set()

        # The API's bearer token signs in too; a wrong one does not.
        async with httpx.AsyncClient(base_url=base) as http:
            wrong = await http.get(f"/ui/jobs/{job_id}", headers={"Authorization": "Bearer nope"})
            right = await http.get(
                f"/ui/jobs/{job_id}", headers={"Authorization": f"Bearer {TOKEN}"}
            )
        assert wrong.status_code == 303 and wrong.headers["location"].startswith("/ui/login")
        assert right.status_code == 200 and job_id in right.text


def start_ui(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "jobstream", "ui"], env=env, stdout=out, stderr=out, cwd=ROOT
        )


async def test_jobstream_ui_serves_the_dashboard_alone(tmp_path) -> None:
    port = free_port()
    namespace = f"d{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "JOBSTREAM_STATUS__BACKEND": "redis",
        "JOBSTREAM_STATUS__URL": REDIS_URL,
        "JOBSTREAM_STATUS__NAMESPACE": namespace,
        "JOBSTREAM_INGRESS__PORT": str(port),
        "JOBSTREAM_INGRESS__AUTH_TOKEN": TOKEN,
        "JOBSTREAM_JOB_MODULES": '["tests.apps.dashboard"]',
        "PYTHONPATH": str(ROOT),
    }
    process = start_ui(env, tmp_path / "ui.log")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            for _ in range(200):
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/livez")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
            signed = {"Authorization": f"Bearer {TOKEN}"}
            jobs = await http.get("/ui/jobs", headers=signed)
            login = await http.get("/ui/jobs")
            api = await http.post("/v1/jobs/test.dash", json={"name": "x"}, headers=signed)
        assert jobs.status_code == 200 and "test.dash" in jobs.text  # its job types
        assert login.status_code == 303 and login.headers["location"].startswith("/ui/login")
        assert api.status_code == 404  # the dashboard alone: no job API
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    assert code == 0, (tmp_path / "ui.log").read_text()
