"""`jobstream spool status|flush`: the installed console script on a spool file made here."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from producer import SpoolSettings
from producer._spool import SpoolFile
from schemas import encode
from schemas.examples import GenerateReport

JOBSTREAM = str(Path(sys.executable).parent / "jobstream")
ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JOBSTREAM_")}
    clean.update({"PYTHONPATH": str(ROOT), **env})
    return subprocess.run(
        [JOBSTREAM, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=clean,
        timeout=60,
        check=False,
    )


def spool_with(path: Path, count: int) -> SpoolFile:
    spool = SpoolFile.open(path, SpoolSettings(path=path))
    jobs = [
        encode(GenerateReport(account_id="a", month="2025-01"), source="/tests", key="a")
        for _ in range(count)
    ]
    spool.append([("jobs.report.generate", message) for message in jobs])
    spool.append([("jobs.other", jobs[0])])
    return spool


def test_status_prints_counts_as_json_while_a_producer_owns_the_spool(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = spool_with(path, 4)  # holds the lock, as a running producer would
    try:
        done = cli("spool", "status", "--path", str(path), "--json")
    finally:
        spool.close()
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["jobs"] == 5
    assert status["destinations"] == {"jobs.report.generate": 4, "jobs.other": 1}
    assert status["bytes"] > 0
    assert status["oldest_age_s"] >= 0


def test_status_reads_the_path_from_the_settings_and_prints_a_table(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool_with(path, 2).close()
    done = cli("spool", "status", JOBSTREAM_SPOOL__PATH=str(path))
    assert done.returncode == 0, done.stderr
    assert "jobs     3" in done.stdout
    assert "jobs.report.generate  2" in done.stdout
    empty = cli("spool", "status", "--path", str(tmp_path / "none.db"), "--json")
    assert (empty.returncode, json.loads(empty.stdout)["jobs"]) == (0, 0)


def test_without_a_path_status_says_what_to_set() -> None:
    done = cli("spool", "status")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: no spool: pass --path or set JOBSTREAM_SPOOL__PATH"


def test_flush_refuses_while_a_producer_owns_the_spool(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = spool_with(path, 1)
    try:
        done = cli("spool", "flush", "--path", str(path))
    finally:
        spool.close()
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"error: the spool {path} is in use by another process")


def test_flush_exits_1_with_one_line_when_the_broker_is_down(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool_with(path, 3).close()
    done = cli(
        "spool",
        "flush",
        "--path",
        str(path),
        JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:1",
        JOBSTREAM_KAFKA__CONNECT_TIMEOUT_S="0.5",
    )
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: kafka is not reachable at 127.0.0.1:1")
    again = cli("spool", "status", "--path", str(path), "--json")
    assert json.loads(again.stdout)["jobs"] == 4  # nothing lost


def foreign(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.txt"
    text.write_text("not a spool\n")
    other = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE customers (id INTEGER)")
    db.commit()
    db.close()
    folder = tmp_path / "folder"
    folder.mkdir()
    return {"text": text, "sqlite": other, "directory": folder}


def test_a_path_that_is_not_a_spool_is_one_line_exit_1_and_left_as_it_was(
    tmp_path: Path,
) -> None:
    files = foreign(tmp_path)
    before = {p.name: p.read_bytes() if p.is_file() else None for p in tmp_path.iterdir()}
    for path in files.values():
        for command in (("status",), ("status", "--json"), ("flush",)):
            done = cli("spool", *command, "--path", str(path))
            assert done.returncode == 1, (command, path, done.stdout)
            [line] = done.stderr.strip().splitlines()
            assert line.startswith(f"error: {path} is not a jobstream spool"), line
    after = {p.name: p.read_bytes() if p.is_file() else None for p in tmp_path.iterdir()}
    assert after == before  # nothing written, nothing added (no lock, journal or table)


def test_status_and_flush_cover_every_slot(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool_with(path, 2).close()
    spool_with(tmp_path / "spool.db.2", 1).close()
    done = cli("spool", "status", "--path", str(path), "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["jobs"] == 5
    assert status["slots"] == [str(path), str(tmp_path / "spool.db.2")]
    assert status["blocked"] == {}
