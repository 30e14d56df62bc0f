"""KeyLimiter: the token bucket decisions under a fake clock, and its use by HttpClient.

Why: the limiter must wait for the refill instead of sending a request the server
will refuse, learn the bucket from every answer (`meta`, epoch ms), and turn a 429
that slipped through into a wait for the refill — without real minutes passing.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from syncd.http import HttpClient, KeyLimiter, QueryKeyAuth, RetryPolicy

NOW = 1_800_000_000.0  # fake wall clock, seconds


class FakeTime:
    """A wall clock that only moves when the limiter sleeps."""

    def __init__(self) -> None:
        self.now = NOW
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def meta(tokens: int, refill_s_ago: float) -> dict[str, Any]:
    return {
        "status": "success",
        "data": [],
        "meta": {"token_count": tokens, "last_refill_time": int((NOW - refill_s_ago) * 1000)},
    }


def limiter(fake: FakeTime, **kwargs: Any) -> KeyLimiter:
    return KeyLimiter(
        source="k",
        min_interval=0,
        refill_slack=0.0,
        clock=fake.clock,
        sleep=fake.sleep,
        **kwargs,
    )


async def test_unknown_bucket_does_not_wait() -> None:
    fake = FakeTime()
    assert await limiter(fake).acquire("GET") < 0.01
    assert fake.slept == []


@pytest.mark.parametrize(
    ("tokens", "method", "waits"),
    [
        (5, "GET", False),
        (1, "GET", False),
        (0, "GET", True),
        (9, "POST", True),  # a write costs 10
        (10, "DELETE", False),
        (9, "PATCH", True),  # unknown methods cost like a write
    ],
)
async def test_waits_only_when_the_known_tokens_do_not_cover_the_cost(
    tokens: int, method: str, waits: bool
) -> None:
    fake = FakeTime()
    lim = limiter(fake)
    await lim.acquire("GET")
    lim.observe(200, {}, meta(tokens, refill_s_ago=45))

    with capture_logs() as logs:
        await lim.acquire(method)

    if waits:
        assert fake.slept == [pytest.approx(15.0)]  # until last_refill_time + 60 s
        (event,) = [e for e in logs if e["event"] == "ratelimit.wait"]
        assert event["reason"] == "token_bucket" and event["wait_ms"] == 15000
    else:
        assert fake.slept == [] and logs == []


async def test_after_the_refill_the_known_capacity_is_spent_before_waiting_again() -> None:
    fake = FakeTime()
    lim = limiter(fake, refill_period=1.0)
    await lim.acquire("GET")
    lim.observe(200, {}, meta(2, refill_s_ago=0))  # a bucket of 3: one spent
    for _ in range(2):
        await lim.acquire("GET")
        lim.observe(200, {}, meta(lim.tokens or 0, refill_s_ago=0))
    assert fake.slept == []
    await lim.acquire("GET")  # the fourth GET waits for the refill
    assert fake.slept == [pytest.approx(1.0)]
    # After the refill the limiter assumes the bucket's size (3), not "unknown".
    assert lim.tokens == 2


async def test_counts_requests_sent_but_not_yet_answered() -> None:
    fake = FakeTime()
    lim = limiter(fake)
    await lim.acquire("GET")
    lim.observe(200, {}, meta(5, refill_s_ago=1))
    for _ in range(3):
        await lim.acquire("GET")  # three in flight
    lim.observe(200, {}, meta(4, refill_s_ago=1))  # the first of them answered
    assert lim.tokens == 2


@pytest.mark.parametrize(
    "body",
    [
        {"error": "GENERAL RATE LIMIT EXCEEDED"},
        {"status": "success", "data": [], "meta": {"token_warning": "costly"}},
        {"status": "success", "data": [], "meta": "odd"},
        "not json",
    ],
)
async def test_answers_without_usable_meta_teach_nothing(body: Any) -> None:
    fake = FakeTime()
    lim = limiter(fake)
    await lim.acquire("GET")
    lim.observe(200, {}, body)
    assert (lim.tokens, lim.last_refill_ms) == (None, None)


async def test_pacing_429_waits_one_slot_and_widens_the_margin_up_to_a_cap() -> None:
    lim = KeyLimiter(source="k", min_interval=0.05, margin=0.002)
    general = {"error": "GENERAL RATE LIMIT EXCEEDED"}
    with capture_logs() as logs:
        first = lim.retry_delay(429, {}, general)
        for _ in range(20):
            last = lim.retry_delay(429, {}, general)
    assert first == pytest.approx(0.053)
    assert last == pytest.approx(0.060)  # never more than 10 ms above the published rule
    assert logs[0]["event"] == "ratelimit.pacing_widened" and logs[0]["interval_ms"] == 53.0
    assert len(logs) == 8  # 53 .. 60 ms, then no more widening to report


async def test_http_client_waits_for_the_refill_after_a_token_429() -> None:
    # A real local server (aioresponses does not support this aiohttp version).
    fake = FakeTime()
    lim = limiter(fake)
    empty = {
        "status": "error",
        "message": "Token bucket is empty",
        "type": "token_rate_limit_exceeded",
        "meta": {"token_count": 0, "last_refill_time": int((NOW - 50) * 1000)},
    }
    answers = [web.json_response(empty, status=429), web.json_response(meta(9999, 0))]
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.query.get("api_key", ""))
        return answers.pop(0)

    app = web.Application()
    app.router.add_get("/api/v3/jobs", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with HttpClient(
            source="k",
            auth=QueryKeyAuth("secret-key-123456"),
            limiter=lim,
            retry=RetryPolicy(max_retries=2),
            sleep=fake.sleep,
        ) as http:
            with capture_logs() as logs:
                body = await http.get_json(str(server.make_url("/api/v3/jobs")))
    finally:
        await server.close()

    assert body["status"] == "success"
    assert seen == ["secret-key-123456"] * 2
    # The client slept the 10 s to the refill, not a generic backoff.
    assert fake.slept[0] == pytest.approx(10.0)
    (retry,) = [e for e in logs if e["event"] == "http.retry"]
    assert retry["status"] == 429 and "api_key=***" in retry["url"]
    assert "secret-key-123456" not in repr(logs)


async def test_a_widened_margin_narrows_again_after_a_calm_stretch() -> None:
    lim = KeyLimiter(source="k", min_interval=0.05, margin=0.002)
    lim.retry_delay(429, {}, {"error": "GENERAL RATE LIMIT EXCEEDED"})
    lim.retry_delay(429, {}, {"error": "GENERAL RATE LIMIT EXCEEDED"})
    assert lim.interval == pytest.approx(0.054)
    for _ in range(999):
        lim.sent()
    assert lim.interval == pytest.approx(0.054)
    for _ in range(1 + 1000 * 5):
        lim.sent()
    assert lim.interval == pytest.approx(0.052)  # back to the configured margin, no lower


async def test_next_slot_counts_from_when_the_previous_request_left() -> None:
    # Real monotonic time, 20 ms slots: the first request is allowed at once but only
    # "leaves" 60 ms later (say, a busy loop); the second must keep 20 ms from that.
    lim = KeyLimiter(source="k", min_interval=0.02, margin=0.0, token_bucket=False)
    lim.sent()  # the client reports departures (HttpClient's trace hook)
    await lim.acquire("GET")
    departed: list[float] = []

    def leave() -> None:
        departed.append(time.monotonic())
        lim.sent()

    asyncio.get_running_loop().call_later(0.06, leave)
    await lim.acquire("GET")
    allowed = time.monotonic()
    assert departed and allowed - departed[0] >= 0.02
