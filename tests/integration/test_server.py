"""The daemon's HTTP endpoints, served in-process over loopback after real syncs.

Why: operators scrape /metrics and read /status to see whether syncd works; the
numbers must be the runs' real numbers and the formats must parse.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from syncd.config import Config, ServerConfig
from syncd.mirror import Database
from syncd.sandbox.caltopo import Fault, populate
from syncd.scheduler import Daemon, backoff_delay
from syncd.server import create_app
from tests.conftest import Sandbox, mirror_rows
from tests.integration.test_daemon import closed_port


@pytest.fixture
async def daemon(sandbox: Sandbox, db: Database) -> Daemon:
    populate(sandbox.caltopo, maps=2, objects_per_map=5, seed=4)
    config = Config(
        server=ServerConfig(enabled=False),
        sources=[sandbox.caltopo_settings("sar", max_retries=1)],
    )
    return Daemon(config, db)


@pytest.fixture
async def client(daemon: Daemon) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(create_app(daemon), host="127.0.0.1")) as test_client:
        yield test_client


async def scrape(client: TestClient[Any, Any]) -> dict[tuple[str, frozenset[Any]], float]:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


async def test_metrics_count_runs_records_requests_and_failures(
    daemon: Daemon, client: TestClient[Any, Any], sandbox: Sandbox, db: Database
) -> None:
    before = await scrape(client)
    assert value(before, "syncd_runs_total", source="sar", status="ok") == 0
    assert value(before, "syncd_last_success_timestamp_seconds", source="sar") == 0

    await daemon.run_source("sar")
    rows = await mirror_rows(db, "sar")
    after = await scrape(client)
    assert value(after, "syncd_runs_total", source="sar", status="ok") == 1
    assert value(after, "syncd_records_total", source="sar", op="inserted") == len(rows)
    assert value(after, "syncd_http_requests_total", source="sar", code="200") == 3
    assert value(after, "syncd_sync_duration_seconds_count", source="sar") == 1
    assert value(after, "syncd_last_success_timestamp_seconds", source="sar") > 0
    assert value(after, "syncd_http_retries_total", source="sar") == 0

    sandbox.caltopo.add_fault(Fault(match="/acct/", status=503, times=-1))
    await daemon.run_source("sar")
    failed = await scrape(client)
    assert value(failed, "syncd_runs_total", source="sar", status="failed") == 1
    assert value(failed, "syncd_http_requests_total", source="sar", code="503") == 2
    assert value(failed, "syncd_http_retries_total", source="sar") == 1
    assert value(failed, "syncd_consecutive_failures", source="sar") == 1
    assert value(failed, "syncd_sync_duration_seconds_count", source="sar") == 2


STATUS_FIELDS = {
    "source": str,
    "type": str,
    "status": str,
    "last_run": dict,
    "last_success_at": str,
    "scopes": int,
    "cursor_age_seconds": float,
    "live": int,
    "deleted": int,
    "interval_s": float,
    "running": bool,
    "consecutive_failures": int,
    "backing_off": bool,
}
RUN_FIELDS = {"id", "status", "started_at", "finished_at", "inserted", "updated", "deleted"}


async def test_status_reports_each_source_with_schedule_state(
    daemon: Daemon, client: TestClient[Any, Any], sandbox: Sandbox
) -> None:
    await daemon.run_source("sar")
    body = await (await client.get("/status")).json()
    assert set(body) >= {"version", "started_at", "stopping", "sources"}
    (source,) = body["sources"]
    for field, kind in STATUS_FIELDS.items():
        assert isinstance(source[field], kind), field
    assert set(source["last_run"]) >= RUN_FIELDS
    assert (source["status"], source["consecutive_failures"], source["scopes"]) == ("ok", 0, 3)
    assert source["next_run_at"] is None  # not scheduled: the scheduler was not started

    sandbox.caltopo.add_fault(Fault(match="/acct/", status=503, times=-1))
    await daemon.run_source("sar")
    body = await (await client.get("/status")).json()
    (source,) = body["sources"]
    assert source["status"] == "failed"
    assert source["consecutive_failures"] == 1
    assert source["backing_off"] is True
    assert source["next_run_at"] is not None
    assert "503" in source["last_error"]


async def test_healthz_follows_the_scheduler_and_readyz_the_database(
    daemon: Daemon, client: TestClient[Any, Any]
) -> None:
    assert (await client.get("/healthz")).status == 503  # scheduler not started
    daemon.scheduler.start()
    try:
        response = await client.get("/healthz")
        assert (response.status, (await response.json())["status"]) == (200, "ok")
        daemon.stop.set()
        assert (await client.get("/healthz")).status == 503  # shutting down
    finally:
        daemon.scheduler.shutdown(wait=False)
    ready = await client.get("/readyz")
    body = await ready.json()
    assert ready.status == 200
    assert body["revision"] == body["head"]


@pytest.mark.parametrize("case", ["unmigrated", "unreachable"])
async def test_readyz_is_503_until_the_database_answers_at_head(
    daemon: Daemon, client: TestClient[Any, Any], tmp_path: Path, case: str
) -> None:
    if case == "unmigrated":
        other = Database(f"sqlite+aiosqlite:///{tmp_path}/empty.db")
    else:
        other = Database(f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port()}/x")
    daemon.db = other
    try:
        response = await client.get("/readyz")
        body = await response.json()
    finally:
        await other.dispose()
    assert response.status == 503
    if case == "unmigrated":
        assert (body["status"], body["revision"]) == ("migrations pending", None)
    else:
        assert body["status"] == "unavailable"
        assert "database read failed" in body["error"]


@pytest.mark.parametrize(
    ("interval", "failures", "cap", "expected"),
    [
        (60, 0, 900, 0),
        (60, 1, 900, 120),
        (60, 2, 900, 240),
        (60, 4, 900, 900),  # capped
        (60, 200, 900, 900),  # no overflow
        (1800, 1, 900, 1800),  # never below the interval itself
    ],
)
def test_backoff_doubles_up_to_the_cap(
    interval: float, failures: int, cap: float, expected: float
) -> None:
    assert backoff_delay(interval, failures, cap) == expected
