"""The shared HTTP client: retries, Retry-After, error mapping, limiter seam, no secrets.

Why: every source relies on `HttpClient` alone for retries, pacing and turning HTTP
answers into the syncd error tree (STYLE.md convention 3). A regression here breaks
all sources at once, or leaks an API key into a log line or an error message.
Upstreams are faked with aioresponses; sleeps are recorded, never slept.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientResponse
from aioresponses import aioresponses
from structlog.testing import capture_logs

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
from syncd.http import (
    BearerAuth,
    HttpClient,
    PreparedRequest,
    QueryKeyAuth,
    RetryPolicy,
    parse_retry_after,
)
from syncd.redact import register_secrets

URL = "https://api.example.test/v1/items"
URL_RE = re.compile(r"^https://api\.example\.test/v1/items(\?.*)?$")
API_KEY = "supersecretkey123"
BEARER = "bearer-token-abc987xyz"


class _NoStreamWriter:
    output_size = 0


class _Response(ClientResponse):
    """aioresponses 0.7.9 builds responses without aiohttp 3.14's `stream_writer`."""

    def __init__(self, method: str, url: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", _NoStreamWriter())
        super().__init__(method, url, **kwargs)


class Upstream:
    """A scripted upstream at URL: answers are served in the order they are added."""

    def __init__(self, mock: aioresponses) -> None:
        self.mock = mock

    def answer(
        self,
        status: int = 200,
        *,
        payload: Any = None,
        body: str | bytes = "",
        headers: Mapping[str, str] | None = None,
        repeat: bool = False,
    ) -> None:
        self.mock.get(
            URL_RE,
            status=status,
            payload=payload,
            body=body,
            headers=dict(headers or {}),
            repeat=repeat,
            response_class=_Response,
        )

    def fail(self, exception: BaseException, *, repeat: bool = False) -> None:
        self.mock.get(URL_RE, exception=exception, repeat=repeat)

    def sent(self) -> list[tuple[str, dict[str, Any]]]:
        """Every request sent: (URL with query, request kwargs)."""
        return [
            (str(url), call.kwargs)
            for (_method, url), calls in self.mock.requests.items()
            for call in calls
        ]


class FakeSleep:
    """Records the delays the client asks for instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


class RecordingLimiter:
    """A RequestLimiter that records every call, in order."""

    def __init__(self, *, retry_after: float | None = None, waited: float = 0.0) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self._retry_after = retry_after
        self._waited = waited

    async def acquire(self, method: str) -> float:
        self.calls.append(("acquire", method))
        return self._waited

    def observe(self, status: int, headers: Mapping[str, str], body: Any) -> None:
        self.calls.append(("observe", status, body))

    def retry_delay(self, status: int, headers: Mapping[str, str], body: Any) -> float | None:
        self.calls.append(("retry_delay", status))
        return self._retry_after


class CountingAuth:
    """Adds a fresh, numbered parameter on every attempt (like an expiring signature)."""

    def __init__(self) -> None:
        self.applied = 0

    def apply(self, request: PreparedRequest) -> None:
        self.applied += 1
        request.params["n"] = str(self.applied)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with aioresponses() as mock:
        yield Upstream(mock)


@pytest.fixture
def sleep() -> FakeSleep:
    return FakeSleep()


def make_client(sleep: FakeSleep, *, max_retries: int = 3, **kwargs: Any) -> HttpClient:
    retry = RetryPolicy(max_retries=max_retries, rng=random.Random(0))
    return HttpClient(source="test", retry=retry, sleep=sleep, **kwargs)


def _all_text(error: BaseException, logs: list[dict[str, Any]]) -> str:
    return f"{error}\n{error!r}\n{getattr(error, 'url', '')}\n{logs!r}"


# --- success and retries ---------------------------------------------------------------


async def test_success_returns_decoded_json_and_counts_the_request(
    upstream: Upstream, sleep: FakeSleep
) -> None:
    upstream.answer(payload={"items": [1, 2], "next": None})
    async with make_client(sleep) as http:
        result = await http.get_json(URL)
    assert result == {"items": [1, 2], "next": None}
    assert http.requests == 1
    assert http.statuses == {200: 1}
    assert http.retries == 0
    assert sleep.delays == []


@pytest.mark.parametrize(
    ("body", "check"),
    [
        pytest.param('{"x": NaN}', lambda v: math.isnan(v["x"]), id="nan-literal"),
        pytest.param('{"x": -Infinity}', lambda v: v["x"] == -math.inf, id="infinity-literal"),
        pytest.param(
            '{"x": 123456789012345678901234567890}',
            lambda v: v["x"] == 123456789012345678901234567890,
            id="big-int",
        ),
    ],
)
async def test_numbers_decode_exactly_as_sent(
    upstream: Upstream, sleep: FakeSleep, body: str, check: Any
) -> None:
    """A faster parser (orjson) would refuse NaN bodies whole and round big integers to
    floats; sources must see them as sent, to skip one bad record or mirror an id exactly."""
    upstream.answer(body=body)
    async with make_client(sleep) as http:
        assert check(await http.get_json(URL))


async def test_server_error_then_success_retries_once_with_one_retry_event(
    upstream: Upstream, sleep: FakeSleep
) -> None:
    upstream.answer(500, payload={"message": "try later"})
    upstream.answer(payload={"ok": True})
    async with make_client(sleep) as http:
        with capture_logs() as logs:
            result = await http.get_json(URL)
    assert result == {"ok": True}
    assert http.requests == 2
    assert http.retries == 1
    assert http.statuses == {500: 1, 200: 1}
    assert len(sleep.delays) == 1
    retries = [e for e in logs if e["event"] == "http.retry"]
    assert len(retries) == 1
    event = retries[0]
    assert event["log_level"] == "warning"
    assert event["source"] == "test"
    assert event["attempt"] == 1
    assert event["status"] == 500
    assert event["delay_ms"] == round(sleep.delays[0] * 1000)
    assert "try later" in event["reason"]


@pytest.mark.parametrize("max_retries", [0, 1, 3])
async def test_persistent_server_error_raises_after_max_retries_plus_one_attempts(
    upstream: Upstream, sleep: FakeSleep, max_retries: int
) -> None:
    upstream.answer(503, repeat=True)
    async with make_client(sleep, max_retries=max_retries) as http:
        with capture_logs() as logs, pytest.raises(UpstreamError) as caught:
            await http.get_json(URL)
    assert caught.value.status == 503
    assert "HTTP 503" in caught.value.message
    assert http.requests == max_retries + 1
    assert len(sleep.delays) == max_retries
    assert [e["attempt"] for e in logs if e["event"] == "http.retry"] == list(
        range(1, max_retries + 1)
    )


async def test_retry_delays_follow_the_policy_backoff(upstream: Upstream, sleep: FakeSleep) -> None:
    upstream.answer(500)
    upstream.answer(500)
    upstream.answer(payload=[])
    policy = RetryPolicy(base_delay=0.5, rng=random.Random(1))
    async with HttpClient(source="test", retry=policy, sleep=sleep) as http:
        assert await http.get_json(URL) == []
    first, second = sleep.delays
    assert 0.25 <= first <= 0.5
    assert 0.5 <= second <= 1.0


async def test_auth_is_applied_afresh_on_every_attempt(
    upstream: Upstream, sleep: FakeSleep
) -> None:
    upstream.answer(502)
    upstream.answer(payload={})
    auth = CountingAuth()
    async with make_client(sleep, auth=auth) as http:
        await http.get_json(URL)
    assert auth.applied == 2
    assert sorted(url for url, _ in upstream.sent()) == [f"{URL}?n=1", f"{URL}?n=2"]


# --- 429 and Retry-After ---------------------------------------------------------------


async def test_429_retry_after_seconds_is_the_recorded_sleep(
    upstream: Upstream, sleep: FakeSleep
) -> None:
    upstream.answer(429, headers={"Retry-After": "7"})
    upstream.answer(payload={"ok": 1})
    async with make_client(sleep) as http:
        assert await http.get_json(URL) == {"ok": 1}
    assert sleep.delays == [7.0]
    assert http.statuses == {429: 1, 200: 1}


@pytest.mark.parametrize(
    ("offset", "low", "high"),
    [
        pytest.param(timedelta(seconds=30), 27.0, 30.0, id="future-date"),
        pytest.param(timedelta(minutes=-5), 0.0, 0.0, id="past-date"),
    ],
)
async def test_429_retry_after_http_date(
    upstream: Upstream, sleep: FakeSleep, offset: timedelta, low: float, high: float
) -> None:
    when = format_datetime(datetime.now(UTC) + offset, usegmt=True)
    upstream.answer(429, headers={"Retry-After": when})
    upstream.answer(payload={})
    async with make_client(sleep) as http:
        await http.get_json(URL)
    assert len(sleep.delays) == 1
    assert low <= sleep.delays[0] <= high


async def test_429_retry_after_beyond_the_cap_fails_instead_of_sleeping(
    upstream: Upstream, sleep: FakeSleep
) -> None:
    upstream.answer(429, headers={"Retry-After": "3600"}, repeat=True)
    async with make_client(sleep) as http:
        with pytest.raises(RateLimitedError) as caught:
            await http.get_json(URL)
    assert caught.value.retry_after == 3600.0
    assert http.requests == 1
    assert sleep.delays == []


# --- answers that must not be retried --------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, ProtocolError),
        (401, AuthError),
        (403, AuthError),
        (404, NotFoundError),
        (422, ProtocolError),
        (302, ProtocolError),
    ],
)
async def test_client_errors_are_raised_without_retry(
    upstream: Upstream, sleep: FakeSleep, status: int, error_type: type[SourceError]
) -> None:
    upstream.answer(status, payload={"error": "nope"}, repeat=True)
    async with make_client(sleep) as http:
        with pytest.raises(SourceError) as caught:
            await http.get_json(URL)
    assert type(caught.value) is error_type
    assert not isinstance(caught.value, RetryableError)
    assert caught.value.status == status
    assert f"HTTP {status}: nope" in caught.value.message
    assert http.requests == 1
    assert sleep.delays == []


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        pytest.param("", "empty body", id="empty"),
        pytest.param("  \n", "empty body", id="whitespace"),
        pytest.param("<html>oops</html>", "body is not JSON", id="html"),
        pytest.param('{"items": [1,', "body is not JSON", id="truncated-json"),
        pytest.param(b"\xff\xfe\x00", "body is not JSON", id="not-utf8"),
    ],
)
async def test_undecodable_success_body_is_a_protocol_error(
    upstream: Upstream, sleep: FakeSleep, body: str | bytes, fragment: str
) -> None:
    upstream.answer(200, body=body, repeat=True)
    async with make_client(sleep) as http:
        with pytest.raises(ProtocolError) as caught:
            await http.get_json(URL)
    assert fragment in caught.value.message
    assert caught.value.status == 200
    assert http.requests == 1


# --- transport failures ----------------------------------------------------------------

TRANSPORT_FAILURES = [
    pytest.param(TimeoutError(), "no answer within", id="timeout"),
    pytest.param(aiohttp.ClientConnectionError("reset by peer"), "connection failed", id="reset"),
    pytest.param(aiohttp.ServerDisconnectedError(), "connection failed", id="disconnect"),
    pytest.param(aiohttp.ClientPayloadError("cut"), "cut short", id="payload"),
]


@pytest.mark.parametrize(("exception", "fragment"), TRANSPORT_FAILURES)
async def test_transport_failure_is_retried_then_raised(
    upstream: Upstream, sleep: FakeSleep, exception: BaseException, fragment: str
) -> None:
    upstream.fail(exception, repeat=True)
    async with make_client(sleep, max_retries=2) as http:
        with pytest.raises(TransportError) as caught:
            await http.get_json(URL)
    assert fragment in caught.value.message
    assert caught.value.url == URL
    assert http.requests == 3
    assert http.statuses == {0: 3}
    assert len(sleep.delays) == 2


@pytest.mark.parametrize(("exception", "fragment"), TRANSPORT_FAILURES)
async def test_transport_failure_then_success_returns_the_body(
    upstream: Upstream, sleep: FakeSleep, exception: BaseException, fragment: str
) -> None:
    upstream.fail(exception)
    upstream.answer(payload={"back": True})
    async with make_client(sleep) as http:
        with capture_logs() as logs:
            assert await http.get_json(URL) == {"back": True}
    assert http.retries == 1
    (event,) = [e for e in logs if e["event"] == "http.retry"]
    assert event["status"] is None
    assert fragment in event["reason"]


# --- the retry policy ------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 42, 1234])
def test_backoff_grows_exponentially_within_equal_jitter_bounds(seed: int) -> None:
    policy = RetryPolicy(max_retries=10, base_delay=1.0, max_delay=60.0, rng=random.Random(seed))
    error = UpstreamError("x")
    delays = [policy.delay(attempt, error) for attempt in range(1, 11)]
    steps = [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]
    for delay, step in zip(delays, steps, strict=True):
        assert delay is not None
        assert step / 2 <= delay <= step
    # While the step doubles, equal jitter keeps each delay at or above the previous one.
    uncapped = delays[:6]
    assert uncapped == sorted(uncapped)
    assert delays[5] > 4 * delays[0]


@pytest.mark.parametrize("max_retries", [0, 1, 3])
def test_policy_gives_up_after_max_retries(max_retries: int) -> None:
    policy = RetryPolicy(max_retries=max_retries, rng=random.Random(0))
    error = TransportError("x")
    assert all(policy.delay(a, error) is not None for a in range(1, max_retries + 1))
    assert policy.delay(max_retries + 1, error) is None


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [(7.0, 7.0), (0.0, 0.0), (300.0, 300.0), (300.5, None), (None, "backoff")],
)
def test_policy_honours_retry_after_up_to_its_cap(
    retry_after: float | None, expected: float | str | None
) -> None:
    policy = RetryPolicy(base_delay=1.0, max_retry_after=300.0, rng=random.Random(0))
    delay = policy.delay(1, RateLimitedError("x", retry_after=retry_after))
    if expected == "backoff":
        assert delay is not None
        assert 0.5 <= delay <= 1.0
    else:
        assert delay == expected


NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("7", 7.0, id="seconds"),
        pytest.param(" 120 ", 120.0, id="padded"),
        pytest.param("1.5", 1.5, id="float"),
        pytest.param("0", 0.0, id="zero"),
        pytest.param("Wed, 01 May 2024 12:00:30 GMT", 30.0, id="http-date"),
        pytest.param("Wed, 01 May 2024 11:00:00 GMT", 0.0, id="past-date"),
        pytest.param("soon", None, id="garbage"),
        pytest.param("Wed, 99 Foo 2024", None, id="bad-date"),
        pytest.param("nan", None, id="nan"),
        pytest.param("inf", None, id="inf"),
        pytest.param("-5", 0.0, id="negative-never-below-zero"),
        pytest.param("", None, id="empty"),
        pytest.param(None, None, id="absent"),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


# --- secrets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type"), [(401, AuthError), (500, UpstreamError), (429, RateLimitedError)]
)
async def test_query_key_never_appears_in_errors_or_logs(
    upstream: Upstream, sleep: FakeSleep, status: int, error_type: type[SourceError]
) -> None:
    upstream.answer(status, payload={"message": "denied"}, repeat=True)
    async with make_client(sleep, max_retries=1, auth=QueryKeyAuth(API_KEY)) as http:
        with capture_logs() as logs, pytest.raises(error_type) as caught:
            await http.get_json(URL, params={"page": "2"})
    # The key really was sent, so its absence below is redaction, not omission.
    assert all(f"api_key={API_KEY}" in url for url, _ in upstream.sent())
    assert API_KEY not in _all_text(caught.value, logs)
    assert "api_key=***" in caught.value.message
    assert "page=2" in caught.value.message
    assert caught.value.url is not None
    assert "api_key=***" in caught.value.url
    if status != 401:
        retry_urls = [e["url"] for e in logs if e["event"] == "http.retry"]
        assert retry_urls
        assert all("api_key=***" in url for url in retry_urls)


async def test_bearer_token_is_sent_but_never_shown(upstream: Upstream, sleep: FakeSleep) -> None:
    upstream.answer(500, payload={"error": "busy"})
    upstream.answer(401, payload={"error": "expired"})
    auth = BearerAuth(BEARER)
    async with make_client(sleep, auth=auth) as http:
        with capture_logs() as logs, pytest.raises(AuthError) as caught:
            await http.get_json(URL)
    sent = upstream.sent()
    assert len(sent) == 2
    assert all(kwargs["headers"]["Authorization"] == f"Bearer {BEARER}" for _, kwargs in sent)
    assert BEARER not in _all_text(caught.value, logs)
    assert BEARER not in repr(auth)
    assert any(e["event"] == "http.retry" for e in logs)


REGISTERED = "registered-secret-Zq81xk"


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        pytest.param(
            {"payload": {"message": f"rejected {URL}?api_key={API_KEY}&x=1"}},
            "rejected",
            id="echoed-url",
        ),
        pytest.param(
            {"payload": {"error": f"credential {REGISTERED} revoked"}},
            "revoked",
            id="registered-json",
        ),
        pytest.param(
            {"body": f"<h1>Forbidden</h1> token {REGISTERED} revoked"},
            "Forbidden",
            id="registered-html",
        ),
        pytest.param(
            {"payload": {"detail": "Authorization: Bearer abc.def.ghi refused"}},
            "refused",
            id="echoed-header",
        ),
        pytest.param(
            {"payload": {"message": f"invalid api_key={API_KEY}"}},
            "invalid",
            id="echoed-bare-param",
        ),
    ],
)
async def test_upstream_error_body_echoing_a_secret_is_redacted(
    upstream: Upstream, sleep: FakeSleep, answer: dict[str, Any], said: str
) -> None:
    register_secrets([REGISTERED])
    upstream.answer(403, **answer)
    async with make_client(sleep, auth=QueryKeyAuth(API_KEY)) as http:
        with pytest.raises(AuthError) as caught:
            await http.get_json(URL)
    message = caught.value.message
    assert said in message  # the upstream's words are kept ...
    assert "***" in message.split("HTTP 403", 1)[1]  # ... with the secret masked
    for secret in (API_KEY, REGISTERED, "abc.def.ghi"):
        assert secret not in message


# --- the limiter seam ----------------------------------------------------------------


async def test_limiter_acquires_before_every_attempt_and_observes_every_answer(
    upstream: Upstream, sleep: FakeSleep
) -> None:
    upstream.fail(TimeoutError())
    upstream.answer(500, payload={"error": "boom"})
    upstream.answer(429, payload={"error": "slow down"})
    upstream.answer(payload={"ok": True})
    limiter = RecordingLimiter(retry_after=4.5)
    async with make_client(sleep, limiter=limiter) as http:
        assert await http.get_json(URL) == {"ok": True}
    assert limiter.calls == [
        ("acquire", "GET"),  # timed out: no answer to observe
        ("acquire", "GET"),
        ("observe", 500, {"error": "boom"}),
        ("acquire", "GET"),
        ("observe", 429, {"error": "slow down"}),
        ("retry_delay", 429),
        ("acquire", "GET"),
        ("observe", 200, {"ok": True}),
    ]
    assert sleep.delays[2] == 4.5  # the limiter's delay for the 429 without Retry-After
    assert http.ratelimit_waits == 0


async def test_retry_after_header_wins_over_the_limiter(
    upstream: Upstream, sleep: FakeSleep
) -> None:
    upstream.answer(429, headers={"Retry-After": "7"})
    upstream.answer(payload={})
    limiter = RecordingLimiter(retry_after=99.0)
    async with make_client(sleep, limiter=limiter) as http:
        await http.get_json(URL)
    assert sleep.delays == [7.0]
    assert ("retry_delay", 429) not in limiter.calls


async def test_limiter_without_advice_falls_back_to_backoff(
    upstream: Upstream, sleep: FakeSleep
) -> None:
    upstream.answer(429)
    upstream.answer(payload={})
    async with make_client(sleep, limiter=RecordingLimiter(retry_after=None)) as http:
        await http.get_json(URL)
    assert len(sleep.delays) == 1
    assert 0.5 <= sleep.delays[0] <= 1.0


async def test_limiter_waits_are_counted(upstream: Upstream, sleep: FakeSleep) -> None:
    upstream.answer(500)
    upstream.answer(payload={})
    async with make_client(sleep, limiter=RecordingLimiter(waited=0.25)) as http:
        await http.get_json(URL)
    assert http.ratelimit_waits == 2
    assert http.requests == 2


# --- documents: large answers kept undecoded ------------------------------------------


async def test_document_is_the_body_undecoded_after_the_same_retries(
    upstream: Upstream, sleep: FakeSleep
) -> None:
    upstream.answer(503, payload={"error": "busy"})
    upstream.answer(body='{"list": [1, 2, 3]}')
    limiter = RecordingLimiter()
    async with make_client(sleep, limiter=limiter) as http:
        document = await http.get_document(URL)
    assert list(document.items("list.item")) == [1, 2, 3]
    assert document.size == len('{"list": [1, 2, 3]}')
    assert (http.requests, http.retries) == (2, 1)
    # The error answer is decoded for the limiter as with get_json; the document is not.
    assert [c for c in limiter.calls if c[0] == "observe"] == [
        ("observe", 503, {"error": "busy"}),
        ("observe", 200, None),
    ]
    document.close()


async def test_document_error_answers_raise_as_get_json_does(
    upstream: Upstream, sleep: FakeSleep
) -> None:
    upstream.answer(401, payload={"message": "login required"})
    async with make_client(sleep) as http:
        with pytest.raises(AuthError, match="HTTP 401: login required"):
            await http.get_document(URL)
    assert http.retries == 0
