"""Secrets read from files (a Kubernetes Secret mounted as a file, docs/security.md).

`read_secret_file` is the one reader of every `*_file` secret setting; `secret_text` picks
a secret from its setting or its file; `with_password` puts a password kept in a file into
a store URL at connect time, so the URL setting itself holds none (idempotency, status,
unique keys, the outbox).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import SecretStr

__all__ = ["read_secret_file", "secret_text", "with_password"]


def read_secret_file(file: Path, setting: str) -> str:
    """The text of `file` without one trailing newline (how a Kubernetes Secret mounted as a
    file, or `echo ... >file`, holds it). `ValueError` naming `setting` (the `*_file`
    setting) if it cannot be read; the message never holds the secret."""
    try:
        return file.read_text().removesuffix("\n").removesuffix("\r")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        msg = f"cannot read {setting} {file}: {reason}; point it at a readable file"
        raise ValueError(msg) from None


def secret_text(value: SecretStr | None, file: Path | None, setting: str) -> str | None:
    """The secret `value`, or the text of `file` (`read_secret_file`, `ValueError` naming
    `<setting>_file`), or None when neither is given."""
    if value is not None:
        return value.get_secret_value()
    return None if file is None else read_secret_file(file, f"{setting}_file")


def with_password(url: str, password_file: Path | None, setting: str) -> str:
    """`url` with the password read from `password_file` (without its trailing newline)
    put in: into the URL's user part (`redis://:pw@host`, `postgresql://user:pw@host`),
    or appended as `password=...` to a PostgreSQL conninfo string. `ValueError` naming
    `setting` if the file cannot be read; the message never holds the password."""
    if password_file is None:
        return url
    password = read_secret_file(password_file, setting)
    if "://" not in url:  # conninfo: key=value pairs, values quoted with '...'
        escaped = password.replace("\\", "\\\\").replace("'", "\\'")
        return f"{url} password='{escaped}'"
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0].partition(":")[0]
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))
