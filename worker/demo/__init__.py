"""The demo: an embedded redis-server, local workers, and ``cascade demo``."""
