"""The transactional outbox (docs/outbox.md): `Outbox.add` writes a job into the caller's
PostgreSQL transaction; `OutboxRelay` (`jobstream outbox relay`) publishes what committed.

Needs psycopg 3 (the `postgres` extra), so it is a module of its own: `import producer`
does not load it.
"""

from producer._outbox import DEFAULT_TABLE, Outbox, OutboxRow, outbox_ddl
from producer._outbox_relay import OutboxRelay, RelayOptions

__all__ = ["DEFAULT_TABLE", "Outbox", "OutboxRelay", "OutboxRow", "RelayOptions", "outbox_ddl"]
