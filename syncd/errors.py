"""The one error tree of syncd, split by what the caller must do.

    SyncdError
    ├── ConfigError              refuse to start; message names file and key
    ├── StorageError             the mirror database failed (cause kept as __cause__)
    └── SourceError              talking to an upstream failed
        ├── RetryableError       try again after a delay (the HTTP client does)
        │   ├── TransportError   connection refused/reset, timeout, truncated body
        │   ├── UpstreamError    5xx
        │   └── RateLimitedError 429 (carries retry_after)
        ├── FatalSourceError     retrying will not help
        │   ├── AuthError        401/403: bad or revoked credentials, missing scope
        │   ├── NotFoundError    404: the scope vanished
        │   └── ProtocolError    other 4xx, malformed or unexpected body
        └── RecordError          one upstream object is unusable; skip it, keep syncing

Messages never contain secrets: URLs are redacted before they are put in an error
(see syncd.redact), and no error embeds a request's headers or credentials.
"""

from __future__ import annotations


class SyncdError(Exception):
    """Something syncd could not do."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or type(self).__name__).strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(SyncdError):
    """The configuration is invalid."""


class StorageError(SyncdError):
    """The mirror database failed."""


class SourceError(SyncdError):
    """An upstream request failed."""

    def __init__(
        self, message: str | None = None, *, url: str | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.url = url  # already redacted
        self.status = status
        self.payload: object = None
        """The decoded JSON body of an HTTP error answer, for sources that read error
        details from it (e.g. Kartorium's `missing_scope`); never logged as a whole."""


class RetryableError(SourceError):
    """A transient upstream failure; the request may succeed if repeated."""


class TransportError(RetryableError):
    """The connection failed, timed out or was cut short."""


class UpstreamError(RetryableError):
    """The upstream answered with a server error."""


class RateLimitedError(RetryableError):
    """The upstream refused the request for exceeding its rate limit."""

    def __init__(
        self,
        message: str | None = None,
        *,
        url: str | None = None,
        status: int | None = 429,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, url=url, status=status)
        self.retry_after = retry_after


class FatalSourceError(SourceError):
    """An upstream failure that repeating the request will not fix."""


class AuthError(FatalSourceError):
    """The upstream rejected the credentials."""


class NotFoundError(FatalSourceError):
    """The upstream does not know the requested object."""


class ProtocolError(FatalSourceError):
    """The upstream answer was not what its API promises."""


class RecordError(SourceError):
    """One upstream object could not be normalized."""
