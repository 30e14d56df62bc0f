"""How a request carries credentials. Applied afresh on every attempt (signatures expire)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class PreparedRequest:
    """A request about to be sent; auth may add query parameters or headers."""

    method: str
    url: str
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


class Auth(Protocol):
    """Adds credentials to a request just before each attempt is sent."""

    def apply(self, request: PreparedRequest) -> None: ...


class NoAuth:
    """For upstreams that need no credentials."""

    def apply(self, request: PreparedRequest) -> None:
        return None


@dataclass(frozen=True, repr=False)
class BearerAuth:
    """`Authorization: Bearer <token>`."""

    token: str

    def apply(self, request: PreparedRequest) -> None:
        request.headers["Authorization"] = f"Bearer {self.token}"


@dataclass(frozen=True, repr=False)
class QueryKeyAuth:
    """A key in the query string (Katapult's only form); redacted by name in every URL we show."""

    token: str
    param: str = "api_key"

    def apply(self, request: PreparedRequest) -> None:
        request.params[self.param] = self.token
