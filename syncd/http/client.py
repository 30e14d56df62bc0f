"""The shared HTTP client: one session per source, timeouts, retries, limits, error mapping.

Sources never handle aiohttp errors, status codes or retries themselves; they ask
this client for JSON and get either the decoded body or an error from syncd.errors.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import aiohttp
import structlog

from syncd import __version__, faults
from syncd.errors import (
    AuthError,
    NotFoundError,
    ProtocolError,
    RateLimitedError,
    RetryableError,
    SourceError,
    TransportError,
    UpstreamError,
)
from syncd.http.auth import Auth, NoAuth, PreparedRequest
from syncd.http.document import JsonDocument, spool
from syncd.http.limits import RequestLimiter, Unlimited
from syncd.http.retry import RetryPolicy, parse_retry_after
from syncd.redact import redact_text, redact_url

log = structlog.get_logger(__name__)

Sleep = Callable[[float], Awaitable[None]]
_SNIPPET = 200


class HttpClient:
    """Sends requests for one source and turns every failure into a SourceError."""

    def __init__(
        self,
        *,
        source: str,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        auth: Auth | None = None,
        limiter: RequestLimiter | None = None,
        concurrency: int = 4,
        session: aiohttp.ClientSession | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.source = source
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.auth = auth or NoAuth()
        self.limiter = limiter or Unlimited()
        self._concurrency = concurrency
        self._session = session
        self._owns_session = session is None
        self._sleep = sleep
        self.requests = 0
        """Requests sent, retries included."""
        self.statuses: Counter[int] = Counter()
        """Answers by HTTP status; 0 counts requests that got no answer."""
        self.retries = 0
        self.ratelimit_waits = 0
        """Times the limiter held a request back before sending it."""
        self.server_date: datetime | None = None
        """The `Date` header of the last answer: lets `check` name clock skew."""

    async def __aenter__(self) -> HttpClient:
        if self._session is None:
            trace = aiohttp.TraceConfig()
            trace.on_request_headers_sent.append(self._headers_sent)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._concurrency),
                headers={"User-Agent": f"syncd/{__version__}"},
                raise_for_status=False,
                trace_configs=[trace],
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _headers_sent(self, session: Any, context: Any, params: Any) -> None:
        # Pacing limiters space requests by when they actually left, not by when they
        # were allowed to leave (the loop may be busy in between). Optional hook.
        sent = getattr(self.limiter, "sent", None)
        if sent is not None:
            sent()

    async def close(self) -> None:
        """Close the session if this client opened it."""
        if self._session is not None and self._owns_session:
            await self._session.close()
            self._session = None

    async def get_json(self, url: str, *, params: Mapping[str, str] | None = None) -> Any:
        """GET a JSON document, retrying transient failures per the retry policy."""
        return await self.request_json("GET", url, params=params)

    async def get_document(
        self, url: str, *, params: Mapping[str, str] | None = None
    ) -> JsonDocument:
        """GET a possibly large JSON answer without parsing it (syncd.http.document).

        The body is read to its end (a cut-short body is retried like any other), kept
        in a spooled file and returned undecoded; the caller reads it as a stream and
        closes it. Error answers are decoded and raised exactly as `get_json` does.
        """
        document = await self._retrying("GET", url, params, stream=True)
        assert isinstance(document, JsonDocument)
        return document

    async def request_json(
        self, method: str, url: str, *, params: Mapping[str, str] | None = None
    ) -> Any:
        """Send a request and decode its JSON body; raise a SourceError on failure."""
        return await self._retrying(method, url, params, stream=False)

    async def _retrying(
        self, method: str, url: str, params: Mapping[str, str] | None, *, stream: bool
    ) -> Any:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._attempt(method, url, dict(params or {}), stream=stream)
            except RetryableError as error:
                delay = self.retry.delay(attempt, error)
                if delay is None:
                    raise
                self.retries += 1
                log.warning(
                    "http.retry",
                    source=self.source,
                    method=method,
                    url=error.url,
                    status=error.status,
                    attempt=attempt,
                    delay_ms=round(delay * 1000),
                    reason=error.message,
                )
                await self._sleep(delay)

    async def _attempt(self, method: str, url: str, params: dict[str, str], *, stream: bool) -> Any:
        if self._session is None:
            raise RuntimeError("HttpClient used outside 'async with'")
        request = PreparedRequest(method=method, url=url, params=params)
        self.auth.apply(request)
        shown = redact_url(_with_query(url, request.params))
        if await self.limiter.acquire(method) > 0:
            self.ratelimit_waits += 1
        self.requests += 1
        faults.on_request()  # a test hook; inert unless armed
        document: JsonDocument | None = None
        try:
            async with self._session.request(
                method,
                url,
                params=request.params,
                headers=request.headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                allow_redirects=False,
            ) as response:
                status = response.status
                headers = response.headers
                if stream and 200 <= status < 300:
                    document = await _spooled(response, shown)
                else:
                    body = await response.read()
        except TimeoutError:
            self.statuses[0] += 1
            raise TransportError(
                f"{method} {shown}: no answer within {self.timeout:g}s", url=shown
            ) from None
        except aiohttp.ClientPayloadError as err:
            self.statuses[0] += 1
            raise TransportError(
                f"{method} {shown}: response body cut short ({type(err).__name__})", url=shown
            ) from None
        except aiohttp.InvalidURL:
            raise ProtocolError(f"{method} {shown}: invalid URL", url=shown) from None
        except aiohttp.ClientError as err:
            self.statuses[0] += 1
            reason = redact_text(str(err)) or type(err).__name__
            raise TransportError(
                f"{method} {shown}: {_transport_failure(err)}: {reason}", url=shown
            ) from None
        self.statuses[status] += 1
        self.server_date = _http_date(headers.get("Date"))
        if document is not None:
            self.limiter.observe(status, headers, None)
            return document
        payload = _decode(body)
        self.limiter.observe(status, headers, payload)
        error = classify(status, body, payload, headers, method=method, url=shown)
        if error is not None:
            error.payload = None if payload is _INVALID else payload
            if isinstance(error, RateLimitedError) and error.retry_after is None:
                error.retry_after = self.limiter.retry_delay(status, headers, payload)
            raise error
        if payload is _INVALID:
            snippet = "empty body" if not body.strip() else "body is not JSON"
            raise ProtocolError(
                f"{method} {shown}: HTTP {status}, {snippet}", url=shown, status=status
            )
        return payload


_INVALID: Any = object()


async def _spooled(response: aiohttp.ClientResponse, url: str) -> JsonDocument:
    """The whole body in a spooled file; a body cut short raises as `read()` would."""
    file = spool()
    size = 0
    try:
        async for chunk in response.content.iter_chunked(256 * 1024):
            file.write(chunk)
            size += len(chunk)
    except BaseException:
        file.close()
        raise
    return JsonDocument(file, size, url=url)


def _transport_failure(err: aiohttp.ClientError) -> str:
    """Name the layer that failed, so `syncd check` tells DNS from TLS from refusal."""
    if isinstance(err, aiohttp.ClientConnectorDNSError):
        return "DNS lookup failed"
    if isinstance(err, aiohttp.ClientConnectorCertificateError):
        return "TLS certificate rejected"
    if isinstance(err, aiohttp.ClientSSLError):
        return "TLS handshake failed"
    return "connection failed"


def _http_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None


def _decode(body: bytes) -> Any:
    """The parsed body, by the stdlib: orjson parsed a 100k-object map only 0.4 s faster
    once the collector was tuned (`syncd.cli.tune_gc`), and it silently turns integers
    over 64 bits into floats, which a mirror must not do (tests/bench, issue 7)."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _INVALID


def classify(  # noqa: PLR0911 - one return per class of answer, read as a table
    status: int,
    body: bytes,
    payload: Any,
    headers: Mapping[str, str],
    *,
    method: str,
    url: str,
) -> SourceError | None:
    """Map an HTTP answer to the error a caller must act on, or None for success."""
    if 200 <= status < 300:
        return None
    message = f"{method} {url}: HTTP {status}{_upstream_message(body, payload)}"
    if status == 429:
        return RateLimitedError(
            message,
            url=url,
            status=status,
            retry_after=parse_retry_after(headers.get("Retry-After")),
        )
    if status in (401, 403):
        return AuthError(message, url=url, status=status)
    if status == 404:
        return NotFoundError(message, url=url, status=status)
    if status in (408, 425) or status >= 500:
        return UpstreamError(message, url=url, status=status)
    if 300 <= status < 400:
        return ProtocolError(f"{message} (unexpected redirect)", url=url, status=status)
    return ProtocolError(message, url=url, status=status)


def _upstream_message(body: bytes, payload: Any) -> str:
    """A short, redacted excerpt of what the upstream said about its error."""
    text: str | None = None
    if isinstance(payload, dict):
        for key in ("message", "error", "detail", "type"):
            value = payload.get(key)
            if isinstance(value, str) and value:
                text = value
                break
    elif payload is _INVALID and body:
        text = body[:_SNIPPET].decode("utf-8", "replace")
    if not text:
        return ""
    text = " ".join(text.split())[:_SNIPPET]
    return f": {redact_text(text)}"


def _with_query(url: str, params: Mapping[str, str]) -> str:
    if not params:
        return url
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}{urlencode(params)}"
