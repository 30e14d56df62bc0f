"""Prometheus metrics of `syncd run`, fed from each run's outcome.

The engine knows nothing about metrics: the daemon hands every finished `RunOutcome`
(run counts plus the HTTP client's counters) to `Metrics.observe`. Each daemon owns
its registry, so several daemons in one process (tests) never share counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from syncd.engine import RunOutcome

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Syncs range from a sub-second no-change poll to a multi-minute first import.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

RECORD_OPS = ("inserted", "updated", "restored", "unchanged", "deleted", "held")


class Metrics:
    """Every metric the daemon exports, in its own registry."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        # `*_created` series double the output and no syncd dashboard needs them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        self._clock = clock
        self.runs = Counter(
            "syncd_runs",
            "Syncs finished, by source and final status (ok, partial, failed).",
            ["source", "status"],
            registry=self.registry,
        )
        self.records = Counter(
            "syncd_records",
            "Mirror rows written by syncs, by operation "
            "(inserted, updated, restored, unchanged, deleted, held).",
            ["source", "op"],
            registry=self.registry,
        )
        self.http_requests = Counter(
            "syncd_http_requests",
            "HTTP answers received from upstreams by status code (0: no answer).",
            ["source", "code"],
            registry=self.registry,
        )
        self.http_retries = Counter(
            "syncd_http_retries",
            "Requests retried after a transient failure (timeout, reset, 5xx, 429).",
            ["source"],
            registry=self.registry,
        )
        self.ratelimit_waits = Counter(
            "syncd_ratelimit_waits",
            "Requests the client-side rate limiter held back before sending.",
            ["source"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "syncd_sync_duration_seconds",
            "Wall time of one sync of one source.",
            ["source"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.last_success = Gauge(
            "syncd_last_success_timestamp_seconds",
            "Unix time of the last sync that ended ok (0: none since start).",
            ["source"],
            registry=self.registry,
        )
        self.consecutive_failures = Gauge(
            "syncd_consecutive_failures",
            "Failed syncs in a row; the scheduler backs off while it grows.",
            ["source"],
            registry=self.registry,
        )

    def register_source(self, source: str) -> None:
        """Create a source's series at zero, so dashboards see it before its first run."""
        self.last_success.labels(source).set(0)
        self.consecutive_failures.labels(source).set(0)
        self.http_retries.labels(source)
        self.ratelimit_waits.labels(source)
        self.duration.labels(source)
        for status in ("ok", "partial", "failed"):
            self.runs.labels(source, status)
        for op in RECORD_OPS:
            self.records.labels(source, op)

    def observe(self, outcome: RunOutcome, *, consecutive_failures: int) -> None:
        """Add one finished run."""
        source = outcome.source
        self.runs.labels(source, outcome.status).inc()
        counts = outcome.counts()
        for op in RECORD_OPS:
            self.records.labels(source, op).inc(counts[op])
        for code, n in outcome.statuses.items():
            self.http_requests.labels(source, str(code)).inc(n)
        self.http_retries.labels(source).inc(outcome.retries)
        self.ratelimit_waits.labels(source).inc(outcome.ratelimit_waits)
        self.duration.labels(source).observe(outcome.duration_ms / 1000)
        if outcome.status == "ok":
            self.last_success.labels(source).set(self._clock())
        self.consecutive_failures.labels(source).set(consecutive_failures)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
