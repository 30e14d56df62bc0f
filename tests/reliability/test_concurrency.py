"""Two `syncd sync` processes on one SQLite file at once: the second waits, nothing doubles.

Why (issue 6): overlapping cron runs, or a manual sync beside the daemon, must neither
corrupt the file nor apply a pass twice (or apply an older pass over a newer one). The
choice, documented in syncd/mirror/lock.py and the README: per source, the second
process waits for the first to finish, logs `sync.waiting`, then syncs from the cursors
the first stored.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from syncd.sandbox.caltopo import Fault
from tests.conftest import Sandbox
from tests.reliability.harness import (
    assert_matches_world,
    integrity,
    mirror_state,
    syncd,
    write_config,
)
from tests.reliability.platforms import PLATFORMS, Platform
from tests.reliability.tally import record


@pytest.mark.parametrize("platform", PLATFORMS, ids=lambda p: p.name)
async def test_second_process_waits_and_applies_nothing_twice(
    sandbox: Sandbox, tmp_path: Path, platform: Platform
) -> None:
    platform.build(sandbox.worlds)
    # Both start at once; whichever takes the source first has its first request hang
    # 1.5 s (inside the 2 s timeout), far longer than the two processes' start-up skew,
    # so the other certainly arrives while it runs.
    platform.add_fault(sandbox.worlds, Fault(platform.routes[0], kind="hang", delay=1.5))
    db_file = tmp_path / "mirror.db"
    config = str(
        write_config(tmp_path / "c.toml", db_file, sandbox.worlds, sandbox.url, (platform,))
    )
    assert (await syncd("db", "upgrade", "--config", config)).code == 0

    results = await asyncio.gather(*(syncd("sync", "--config", config) for _ in range(2)))

    assert [r.code for r in results] == [0, 0], [r.stderr for r in results]
    waited = [r for r in results if any(e["event"] == "sync.waiting" for e in r.events())]
    assert len(waited) == 1, "exactly one process had to wait"
    second = waited[0]
    assert integrity(db_file) == "ok"
    state = mirror_state(db_file)
    assert_matches_world(state, sandbox.worlds, (platform,))
    # Applied once: every row is at version 1 with a single "insert" in the change feed.
    assert {v["version"] for v in state.values()} == {1}
    assert {tuple(v["ops"]) for v in state.values()} == {(("insert", 1),)}
    [finished] = [e for e in second.events() if e["event"] == "sync.finished"]
    assert finished["inserted"] == finished["updated"] == finished["deleted"] == 0
    record("concurrency", cases=1)
