"""Client-side rate limits: the seam where pacing and token buckets plug in.

The client calls `acquire()` before every attempt and `observe()` after every answer,
so a limiter can both space requests and learn budgets the upstream reports
(ARCHITECTURE.md §1 rule 7). Sources without published limits use `Unlimited`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class RequestLimiter(Protocol):
    """Decides when the next request may go out."""

    async def acquire(self, method: str) -> float:
        """Wait until a request with this method may be sent; return the seconds waited."""
        ...

    def observe(self, status: int, headers: Mapping[str, str], body: Any) -> None:
        """Learn from an answer (success or error), e.g. a remaining token count."""
        ...

    def retry_delay(self, status: int, headers: Mapping[str, str], body: Any) -> float | None:
        """Seconds to wait after a 429 that carries no Retry-After, if the limiter knows."""
        ...


class Unlimited:
    """No client-side limit: for upstreams that publish none (429s are still honoured)."""

    async def acquire(self, method: str) -> float:
        return 0.0

    def observe(self, status: int, headers: Mapping[str, str], body: Any) -> None:
        return None

    def retry_delay(self, status: int, headers: Mapping[str, str], body: Any) -> float | None:
        return None
