"""Client-side pacing and token budgets, for APIs that publish them (Katapult Pro).

Why: ARCHITECTURE.md §1 rule 7 — limits are obeyed *before* the server enforces them.
`KeyLimiter` implements the `RequestLimiter` seam of the shared client for one API
key. One instance serves every concurrent task of a source (one HttpClient per source
run), so the spacing it enforces is the key's, not a task's.

- Pacing: at most one request per `interval` (asyncio-throttle), plus a small safety
  margin so that jitter between our send and the server's arrival stamp never brings
  two requests closer than the server's rule.
- Token bucket: every answer's `meta.token_count` / `meta.last_refill_time` (epoch ms)
  is remembered; before a request whose cost exceeds the known remaining tokens, the
  limiter sleeps until `last_refill_time + refill_period` (the bucket refills in full,
  FACTS.md Katapult) and logs one `ratelimit.wait` event.
- A 429 that slipped through anyway is retried by the client after `retry_delay()`:
  the refill time when the answer carries `meta`, else one pacing interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from asyncio_throttle.throttler import Throttler

log = structlog.get_logger(__name__)

DEFAULT_COSTS: Mapping[str, int] = {"GET": 1, "POST": 10, "DELETE": 10}
"""Katapult v3 token costs per method (katapult-openapi-v3.yaml `x-token-cost`)."""

_POLL = 0.001  # asyncio-throttle re-checks this often when a slot is not yet free
_WIDEN = 0.001  # margin added after each 429 of the pacing rule ...
_MAX_MARGIN = 0.010  # ... up to this much above the published interval,
_NARROW_AFTER = 1000  # and narrowed by the same step after this many calm requests
_LEAVE_TIMEOUT = 1.0  # a request that never left (connection failed) holds the next this long
_SPIN = 0.001  # the last stretch before a slot is waited by yielding, not by a timer


class KeyLimiter:
    """Pacing plus a server-reported token bucket for one API key (a `RequestLimiter`)."""

    def __init__(
        self,
        *,
        source: str,
        min_interval: float = 0.05,
        margin: float = 0.002,
        token_bucket: bool = True,
        refill_period: float = 60.0,
        costs: Mapping[str, int] = DEFAULT_COSTS,
        refill_slack: float = 0.05,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.source = source
        self.min_interval = min_interval
        self.interval = min_interval + margin if min_interval > 0 else 0.0
        self._base_interval = self.interval
        self._calm = 0
        self._throttler = (
            Throttler(rate_limit=1, period=self.interval, retry_interval=_POLL)
            if self.interval > 0
            else None
        )
        self.token_bucket = token_bucket
        self.refill_period = refill_period
        self.costs = dict(costs)
        self._slack = refill_slack
        self._clock = clock
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self._pace_lock = asyncio.Lock()
        self._last_slot = -math.inf
        self._last_sent = -math.inf
        self._left = asyncio.Event()
        self._left.set()
        self._hooked = False
        self.tokens: int | None = None
        """Tokens we believe remain: the server's last count minus what we sent since."""
        self.capacity: int | None = None
        """Lower bound of the bucket's size (a count plus its request's cost)."""
        self.last_refill_ms: int | None = None
        self.token_waits = 0
        self._pending: deque[tuple[int, float]] = deque()
        """(cost, sent at) of requests sent but not yet answered, oldest first."""

    def cost(self, method: str) -> int:
        """Token cost of one request with this method (unknown methods cost like a write)."""
        return self.costs.get(method.upper(), max(self.costs.values(), default=1))

    async def acquire(self, method: str) -> float:
        """Wait for budget, then for the pacing slot; return the seconds waited."""
        started = time.monotonic()
        if self.token_bucket:
            await self._reserve(self.cost(method))
        if self._throttler is not None:
            await self._pace(self._throttler)
        return time.monotonic() - started

    async def _pace(self, throttler: Throttler) -> None:
        # asyncio-throttle is the gate. Its polling, like every asyncio sleep, wakes up
        # to 1 ms late (epoll rounds timeouts up to whole ms), which alone costs ~1% of
        # the permitted rate; so one task at a time sleeps to just before its slot and
        # yields the last millisecond away, then passes the gate on time.
        async with self._pace_lock:
            if self._hooked and not self._left.is_set():
                # The previous request passed the gate but is not on the wire yet (a
                # busy loop, a new connection): its departure sets our slot.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._left.wait(), _LEAVE_TIMEOUT)
            # Re-read the target after every nap: the previous request may leave (and
            # move it later) while we wait.
            while (ahead := self._next_slot() - time.monotonic()) > 0:  # noqa: ASYNC110
                await asyncio.sleep(ahead - _SPIN if ahead > _SPIN else 0)
            await throttler.acquire()  # type: ignore[no-untyped-call]
            self._last_slot = time.monotonic()
            self._left.clear()

    async def _reserve(self, cost: int) -> None:
        # One task at a time decides and sleeps, so a refill wait is logged once and
        # the others queue behind it instead of each sending a doomed request.
        async with self._lock:
            if self.tokens is not None and self.tokens < cost:
                wait = self._until_refill()
                if wait is not None:
                    self.token_waits += 1
                    log.info(
                        "ratelimit.wait",
                        source=self.source,
                        wait_ms=round(wait * 1000),
                        reason="token_bucket",
                        tokens=self.tokens,
                        cost=cost,
                    )
                    await self._sleep(wait)
                # The bucket refills in full: assume the size we know until told.
                self.tokens = self.capacity
            if self.tokens is not None:
                self.tokens -= cost
            self._pending.append((cost, time.monotonic()))

    def _next_slot(self) -> float:
        return max(self._last_slot, self._last_sent) + self.interval

    def sent(self) -> None:
        """The HTTP client wrote a request: the next slot counts from here."""
        self._last_sent = time.monotonic()
        self._hooked = True  # the client reports departures: wait for them
        self._left.set()
        self._calm += 1
        if self._calm >= _NARROW_AFTER and self.interval > self._base_interval:
            # A widened margin is narrowed again after a long calm stretch, so one
            # bad minute does not cost the permitted rate for the process lifetime.
            self._calm = 0
            self.interval = max(self._base_interval, self.interval - _WIDEN)
            if self._throttler is not None:
                self._throttler.period = self.interval

    def _until_refill(self) -> float | None:
        if self.last_refill_ms is None:
            return None
        refill_at = self.last_refill_ms / 1000 + self.refill_period
        return max(0.0, refill_at - self._clock()) + self._slack

    def observe(self, status: int, headers: Mapping[str, str], body: Any) -> None:
        """Learn the bucket from `meta` (present on route answers, absent on middleware 429s)."""
        cost = self._answered()
        meta = body.get("meta") if isinstance(body, dict) else None
        if not self.token_bucket or not isinstance(meta, dict):
            return
        count, refill = meta.get("token_count"), meta.get("last_refill_time")
        if not isinstance(count, int) or not isinstance(refill, int):
            return  # tolerate unknown meta shapes (e.g. a future `token_warning`)
        # Requests sent after this one are not in the server's count yet.
        in_flight = sum(c for c, _ in self._pending)
        if self.last_refill_ms is None or refill > self.last_refill_ms:
            # A refill we had not seen: the server's count is the truth now.
            self.last_refill_ms = refill
            self.tokens = count - in_flight
            self.capacity = max(self.capacity or 0, count + cost)
        elif refill == self.last_refill_ms:
            # Same bucket period: answers may arrive out of order, keep the lowest.
            seen = count - in_flight
            self.tokens = seen if self.tokens is None else min(self.tokens, seen)

    def _answered(self) -> int:
        """Forget the oldest pending request (answers come back in about send order)."""
        horizon = time.monotonic() - max(2 * self.refill_period, 120.0)
        while self._pending and self._pending[0][1] < horizon:
            self._pending.popleft()  # never answered (transport error): stop counting it
        return self._pending.popleft()[0] if self._pending else 0

    def retry_delay(self, status: int, headers: Mapping[str, str], body: Any) -> float | None:
        """After a 429 without Retry-After: the refill time if `meta` says so, else one slot."""
        if status != 429:
            return None
        meta = body.get("meta") if isinstance(body, dict) else None
        if isinstance(meta, dict) and self.last_refill_ms is not None:
            self.tokens = 0  # everyone else waits for the refill too
            return self._until_refill()
        if self._throttler is None:
            return None
        # The pacing rule fired although we kept our spacing: the path to the server
        # jitters more than the margin allows. Widen it a little, for good.
        widened = min(self.interval + _WIDEN, self.min_interval + _MAX_MARGIN)
        self._calm = 0
        if widened > self.interval:
            self.interval = self._throttler.period = widened
            log.warning(
                "ratelimit.pacing_widened", source=self.source, interval_ms=round(widened * 1000, 1)
            )
        return self.interval
