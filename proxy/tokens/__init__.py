"""Token types: one provider module per protocol, one lifecycle for all.

``proxy.auth_types`` names each token type's provider and builds its ``TokenSource``.
"""

from proxy.tokens.lifecycle import Settings, TokenSlot
from proxy.tokens.source import TokenSource

__all__ = ["Settings", "TokenSlot", "TokenSource"]
