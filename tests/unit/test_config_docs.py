"""docs/configuration.md documents every setting a worker reads, the producer's included.

The settings tree is walked from the models (nested sections recursively), so a field added
without a line in the docs fails here, and so does a documented variable that no longer
exists.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path

from pydantic import BaseModel

from consumer import Settings
from jobstream._config import OutboxSettings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
# A table row: | `setting.path` | `JOBSTREAM_...` | ...
DOCUMENTED_ROW = re.compile(r"^\| `[^`]+` \| `(JOBSTREAM_[A-Z0-9_]+)` \|", re.MULTILINE)


def _section(annotation: object) -> type[BaseModel] | None:
    """The nested settings model an annotation holds (optional ones too), else None."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    for candidate in typing.get_args(annotation) if union else (annotation,):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def env_vars(model: type[BaseModel], prefix: str) -> list[str]:
    """The environment variable of every leaf setting of `model`."""
    delimiter = Settings.model_config.get("env_nested_delimiter") or "__"
    names: list[str] = []
    for name, info in model.model_fields.items():
        variable = prefix + name.upper()
        section = _section(info.annotation)
        if section is None:
            names.append(variable)
        else:
            names.extend(env_vars(section, variable + delimiter))
    return names


SETTINGS = env_vars(Settings, Settings.model_config.get("env_prefix") or "")
# `jobstream outbox` reads the producer's settings plus the `outbox` section.
SETTINGS += env_vars(OutboxSettings, "JOBSTREAM_OUTBOX__")


def test_the_walk_reaches_nested_settings() -> None:
    assert "JOBSTREAM_TRANSPORT" in SETTINGS
    assert "JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS" in SETTINGS
    assert "JOBSTREAM_WORKER__MAX_IN_FLIGHT" in SETTINGS
    assert "JOBSTREAM_IDEMPOTENCY__URL" in SETTINGS
    assert "JOBSTREAM_WORKER" not in SETTINGS, "sections are walked into, not listed"


def test_every_setting_is_documented() -> None:
    text = DOC.read_text()
    missing = [name for name in SETTINGS if not re.search(re.escape(name) + r"(?![A-Z0-9_])", text)]
    assert not missing, f"add these settings to docs/configuration.md: {missing}"


def test_every_documented_setting_exists() -> None:
    stale = sorted(set(DOCUMENTED_ROW.findall(DOC.read_text())) - set(SETTINGS))
    assert not stale, f"docs/configuration.md documents settings that do not exist: {stale}"
