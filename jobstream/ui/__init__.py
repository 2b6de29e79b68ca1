"""The on-call dashboard at `/ui` (docs/dashboard.md): jobs and their attempts, dead
letters with replay, the live view. `jobstream ingress` mounts it (`ui.enabled`);
`jobstream ui` serves it alone."""

from jobstream.ui._app import answer_store_outages, create_ui_app, mount

__all__ = ["answer_store_outages", "create_ui_app", "mount"]
