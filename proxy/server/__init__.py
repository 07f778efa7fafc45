"""The caller-facing side: listeners, connection limits, request shape, uploads."""
