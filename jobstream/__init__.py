"""jobstream's application layer: the `jobstream` command line (and the HTTP ingress)."""

__all__: list[str] = []
