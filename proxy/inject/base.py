"""What every injector implements, and the values it injects."""

from __future__ import annotations

from collections.abc import Mapping

from proxy.store.secret import Secret
from proxy.upstream.outbound import Outbound

# A field name (``secret``, ``username``, ...) or a reference string (``PATH#FIELD``, for
# template placeholders) -> its value: a ``Grant``'s values, as the injector receives them.
SecretValues = Mapping[str, Secret]


class Injector:
    """Sets credentials on an outbound request; ``removes`` names headers callers may not supply."""

    removes: tuple[str, ...] = ()
    sends = "signs each request"  # what ``credproxy check`` says it adds, as a template: never a value

    def inject(self, out: Outbound, secrets: SecretValues) -> None:
        raise NotImplementedError
