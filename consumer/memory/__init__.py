"""The in-memory backend (being built)."""
