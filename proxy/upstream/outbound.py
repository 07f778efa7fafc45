"""The request credproxy is about to send upstream, as plain data.

Injectors and signers change this object; they never do I/O themselves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from multidict import CIMultiDict
from yarl import URL


@dataclass
class Outbound:
    method: str
    base: URL  # the credential's upstream: scheme, host, port and path prefix
    path: str  # canonical, percent-encoded, upstream-relative ("/v1/x")
    query: str  # raw query string without "?"
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: bytes | AsyncIterator[bytes] | None = None  # bytes when buffered (replayable, signable)

    @property
    def url(self) -> URL:
        prefix = self.base.raw_path.rstrip("/")
        # host_subcomponent keeps the brackets of an IPv6 literal, which an encoded build needs
        return URL.build(scheme=self.base.scheme, host=self.base.host_subcomponent, port=self.base.explicit_port,
                         path=prefix + self.path, query_string=self.query, encoded=True)

    @property
    def replayable(self) -> bool:
        return self.body is None or isinstance(self.body, bytes)
