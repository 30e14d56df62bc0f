"""`syncd run` as users deploy it: a subprocess against the sandbox, stopped by SIGTERM.

Why: issue 5 promises a daemon that syncs every source on schedule, backs off a failing
source without slowing the others, and on SIGTERM commits or rolls back but never
leaves a half-written scope, then exits 0.
"""

from __future__ import annotations

import itertools
import signal
import socket
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from syncd.sandbox.caltopo import PREFIX, Fault, populate
from tests.conftest import Sandbox
from tests.daemon_process import DaemonProcess, write_config

pytestmark = pytest.mark.timeout(90)


def caltopo_source(sandbox: Sandbox, name: str, **overrides: Any) -> dict[str, Any]:
    world = sandbox.caltopo
    values: dict[str, Any] = {
        "name": name,
        "type": "caltopo",
        "interval": 1,
        "base_url": f"{sandbox.url}{PREFIX}",
        "team_id": world.team_id,
        "credential_id": world.credential_id,
        "credential_secret": world.credential_secret,
        "retry_backoff": 0.01,
        "timeout": 30,
    }
    values.update(overrides)
    return values


@pytest.fixture
async def daemons() -> AsyncIterator[list[DaemonProcess]]:
    """Started daemons; any still running at the end is killed."""
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        await daemon.kill()


def integrity(db_path: Path) -> tuple[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(db_path) as conn:
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
        runs = conn.execute("SELECT source, status, error FROM runs ORDER BY id").fetchall()
    return check, runs


def rows_by_collection(db_path: Path) -> dict[str, int]:
    with sqlite3.connect(db_path) as conn:
        return dict(
            conn.execute(
                "SELECT collection, count(*) FROM features WHERE deleted_at IS NULL "
                "GROUP BY collection"
            ).fetchall()
        )


def cursors(db_path: Path) -> dict[str, str]:
    with sqlite3.connect(db_path) as conn:
        return dict(conn.execute("SELECT scope, cursor FROM cursors").fetchall())


async def test_run_syncs_every_source_and_stops_on_sigterm(
    sandbox: Sandbox, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    populate(sandbox.caltopo, maps=2, objects_per_map=6, seed=5)
    db_path = tmp_path / "mirror.db"
    config = write_config(
        tmp_path / "syncd.toml",
        db_path,
        [caltopo_source(sandbox, "alpha", interval=2), caltopo_source(sandbox, "bravo")],
    )
    daemon = await DaemonProcess.start(config)
    daemons.append(daemon)

    started = await daemon.wait_event("daemon.started")
    assert {s["name"]: s["interval_s"] for s in started["sources"]} == {"alpha": 2, "bravo": 1}
    assert sandbox.caltopo.credential_secret not in str(daemon.events)
    status = await daemon.wait_status(
        lambda s: all(src["status"] == "ok" for src in s["sources"]) and len(s["sources"]) == 2
    )
    assert {s["source"] for s in status["sources"]} == {"alpha", "bravo"}
    assert (await daemon.get_json("/healthz"))["status"] == "ok"

    daemon.signal(signal.SIGHUP)  # not a reload, and above all not the default "terminate"
    await daemon.wait_event("daemon.reload_unsupported")
    assert (await daemon.get_json("/healthz"))["status"] == "ok"

    daemon.signal()
    assert await daemon.wait_exit(within=25) == 0
    stopped = daemon.named("daemon.stopped")
    assert stopped and stopped[0]["exit_code"] == 0
    check, runs = integrity(db_path)
    assert check == "ok"
    assert runs and all(status != "running" for _, status, _ in runs)
    expected = sum(len(sandbox.caltopo.live_objects(m)) for m in sandbox.caltopo.map_ids())
    per_map = rows_by_collection(db_path)
    assert sum(per_map[m] for m in sandbox.caltopo.map_ids()) == 2 * expected  # two sources


async def test_sigterm_mid_sync_commits_no_partial_scope(
    sandbox: Sandbox, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    world = sandbox.caltopo
    populate(world, maps=3, objects_per_map=6, seed=8)
    maps = sorted(world.map_ids())
    slow = maps[1]
    world.add_fault(Fault(match=f"/map/{slow}/", kind="hang", delay=60))
    db_path = tmp_path / "mirror.db"
    config = write_config(
        tmp_path / "syncd.toml", db_path, [caltopo_source(sandbox, "sar", interval=60)]
    )
    daemon = await DaemonProcess.start(config)
    daemons.append(daemon)

    # The two fast maps are applied while the slow one's request hangs upstream.
    await daemon.wait_for(
        lambda _: (
            {e["scope"] for e in daemon.named("scope.applied")}
            >= {f"map:{m}" for m in maps if m != slow}
        ),
        what="the fast maps applied",
    )
    signalled = time.monotonic()
    daemon.signal()
    assert await daemon.wait_exit(within=25) == 0
    assert time.monotonic() - signalled < 10  # it did not wait for the 60 s hang
    assert world.faults[0].times == 0  # the slow map's request really was in flight

    check, runs = integrity(db_path)
    assert check == "ok"
    assert runs == [("sar", "partial", "stopped by shutdown before every scope was synced")]
    per_map = rows_by_collection(db_path)
    stored = cursors(db_path)
    for map_id in maps:
        if map_id == slow:
            # Nothing of the interrupted scope: no rows, and its cursor still says "start over".
            assert per_map.get(map_id, 0) == 0
            assert stored[f"map:{map_id}"] == "0"
        else:
            assert per_map[map_id] == len(world.live_objects(map_id))
            assert int(stored[f"map:{map_id}"]) > 0
    assert daemon.named("sync.stopping")
    assert daemon.named("daemon.stopped")[0]["exit_code"] == 0


def closed_port() -> int:
    """A loopback port nothing listens on: an upstream that is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_failing_source_backs_off_while_another_keeps_its_schedule(
    sandbox: Sandbox, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    populate(sandbox.caltopo, maps=1, objects_per_map=4, seed=2)
    down = caltopo_source(
        sandbox, "down", base_url=f"http://127.0.0.1:{closed_port()}{PREFIX}", max_retries=0
    )
    db_path = tmp_path / "mirror.db"
    config = write_config(
        tmp_path / "syncd.toml", db_path, [caltopo_source(sandbox, "up"), down], max_backoff=30
    )
    daemon = await DaemonProcess.start(config)
    daemons.append(daemon)

    await daemon.wait_event("source.backoff", count=3, source="down", within=40)
    backoffs = daemon.named("source.backoff", source="down")
    assert [b["consecutive_failures"] for b in backoffs[:3]] == [1, 2, 3]
    assert [b["retry_in_s"] for b in backoffs[:3]] == [2, 4, 8]
    # The real gaps between the down source's attempts grow with the back-off.
    attempts = [_at(e) for e in daemon.named("sync.failed", source="down")][:3]
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 1.8 and gaps[1] >= 3.8 and gaps[1] > gaps[0]
    # Meanwhile the healthy source kept its 1 s interval (jitter is at most 10 %).
    window = attempts[-1] - attempts[0]
    ups = [_at(e) for e in daemon.named("sync.finished", source="up")]
    in_window = [t for t in ups if attempts[0] <= t <= attempts[-1]]
    assert len(in_window) >= int(window / 1.1) - 1
    assert all(e["status"] == "ok" for e in daemon.named("sync.finished", source="up"))

    status = await daemon.get_json("/status")
    by_name = {s["source"]: s for s in status["sources"]}
    assert by_name["down"]["consecutive_failures"] >= 3
    assert by_name["down"]["backing_off"] is True
    assert by_name["up"]["consecutive_failures"] == 0
    daemon.signal()
    assert await daemon.wait_exit(within=25) == 0


def _at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


async def test_sync_stuck_past_the_grace_is_cancelled_and_exit_is_nonzero(
    sandbox: Sandbox, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    populate(sandbox.caltopo, maps=1, objects_per_map=4, seed=2)
    db_path = tmp_path / "mirror.db"
    config = write_config(
        tmp_path / "syncd.toml",
        db_path,
        [caltopo_source(sandbox, "sar", interval=1)],
        shutdown_grace=0.5,
    )
    daemon = await DaemonProcess.start(config)
    daemons.append(daemon)
    await daemon.wait_event("sync.finished", source="sar")

    # Another writer holds the SQLite write lock: the next sync waits for it and cannot
    # reach a point where it may stop, so only the grace can end it.
    blocker = sqlite3.connect(db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        await daemon.wait_status(lambda status: status["sources"][0]["running"])
        # While it is stuck, the 1 s schedule skips runs instead of stacking them.
        await daemon.wait_event("sync.skipped", source="sar")
        daemon.signal()
        stopped = await daemon.wait_event("daemon.stopped")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert (stopped["exit_code"], stopped["cancelled"]) == (1, 1)
    assert not [e for e in daemon.events if "maximum number of running" in e["event"]]
    assert await daemon.wait_exit(within=40) == 1
    check, runs = integrity(db_path)
    assert check == "ok"
    assert runs[0][1] == "ok"
    assert all(status != "running" for _, status, _ in runs[1:])
