"""Secrets read from files (a Kubernetes Secret mounted as a file, docs/security.md).

`with_password` puts a password kept in a file into a store URL at connect time, so the
URL setting itself holds none; every store and database connection jobstream opens
(idempotency, status, unique keys, the outbox) goes through it.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

__all__ = ["with_password"]


def with_password(url: str, password_file: Path | None, setting: str) -> str:
    """`url` with the password read from `password_file` (without its trailing newline)
    put in: into the URL's user part (`redis://:pw@host`, `postgresql://user:pw@host`),
    or appended as `password=...` to a PostgreSQL conninfo string. `ValueError` naming
    `setting` if the file cannot be read; the message never holds the password."""
    if password_file is None:
        return url
    try:
        password = password_file.read_text().removesuffix("\n").removesuffix("\r")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        msg = f"cannot read {setting} {password_file}: {reason}; point it at a readable file"
        raise ValueError(msg) from None
    if "://" not in url:  # conninfo: key=value pairs, values quoted with '...'
        escaped = password.replace("\\", "\\\\").replace("'", "\\'")
        return f"{url} password='{escaped}'"
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0].partition(":")[0]
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))
