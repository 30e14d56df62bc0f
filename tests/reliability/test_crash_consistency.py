"""Crash consistency: `syncd sync` SIGKILLed at many points, then restarted, converges.

Why: the promise (ARCHITECTURE.md §1 rules 1-2) is that a crash at any instant leaves
either the old cursor with the old rows or the new cursor with the new rows, so a plain
restart converges. Each kill point copies a mirror that holds the first state of the
world, lets a subprocess sync the changed world until the fault hook (syncd/faults.py)
or a timer SIGKILLs it, restarts it cleanly, and then requires: `PRAGMA integrity_check`
ok; the mirror equal, row by row (live and tombstoned, name, geometry, properties,
version, change-feed ops), to a mirror that synced the same change without a crash;
its live rows equal to the sandbox world; and no run left `running` (the restart
closes the killed pass's row as interrupted).

The default run takes a sample of points; `make test-reliability` (`-m reliability`)
walks every statement, commit and request of a pass, plus random-delay kills.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from syncd.mirror.store import INTERRUPTED
from tests.conftest import Sandbox
from tests.reliability.harness import (
    KILLED,
    assert_matches_world,
    child_env,
    integrity,
    mirror_state,
    runs_of,
    sync_in_process,
    syncd,
    write_config,
)
from tests.reliability.platforms import PLATFORMS, Platform
from tests.reliability.tally import record

PARALLEL = 4  # processes at once; the sandbox serves them all


@dataclass
class Scenario:
    """A mirror of the first world state (the template) and the crash-free outcome."""

    sandbox: Sandbox
    platform: Platform
    tmp: Path
    template: Path
    reference: dict[Any, Any]
    template_runs: int = 0  # the id of the template's last run
    outcomes: Counter[str] = field(default_factory=Counter)
    gate: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(PARALLEL))

    def config(self, db_file: Path) -> Path:
        path = db_file.with_suffix(".toml")
        return write_config(path, db_file, self.sandbox.worlds, self.sandbox.url, (self.platform,))


def copy_db(src: Path, dst: Path) -> None:
    """A consistent copy through SQLite's backup API (the WAL included)."""
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    a.close()
    b.close()


async def prepare(sandbox: Sandbox, platform: Platform, tmp: Path) -> Scenario:
    platform.build(sandbox.worlds)
    template = tmp / "template.db"
    scenario = Scenario(
        sandbox, platform, tmp, template, {}, gate=asyncio.Semaphore(platform.parallel)
    )
    assert await sync_in_process(scenario.config(template)) == ["ok"]
    scenario.template_runs = runs_of(template)[-1][0]
    platform.mutate(sandbox.worlds)
    reference = tmp / "reference.db"
    copy_db(template, reference)
    assert await sync_in_process(scenario.config(reference)) == ["ok"]
    scenario.reference = mirror_state(reference)
    assert_matches_world(scenario.reference, sandbox.worlds, (platform,))
    assert any(not row["live"] for row in scenario.reference.values()), "no tombstone to check"
    return scenario


async def crash_and_recover(scenario: Scenario, point: str | float) -> bool:
    """Kill at `point` ("kind:N" for the hook, seconds for a timer); True if it was killed."""
    label = point if isinstance(point, str) else f"after {point:.3f}s"
    async with scenario.gate:
        db_file = scenario.tmp / f"crash-{str(label).replace(':', '-').replace(' ', '_')}.db"
        copy_db(scenario.template, db_file)
        config = str(scenario.config(db_file))
        if isinstance(point, str):
            crashed = await syncd(
                "sync", "--config", config, env=child_env(SYNCD_FAULT_KILL_AFTER=point)
            )
        else:
            crashed = await syncd("sync", "--config", config, kill_after=point)
        assert crashed.code in (KILLED, 0), f"{label}: exit {crashed.code}: {crashed.stderr}"
        assert "Traceback" not in crashed.stderr + crashed.stdout, label
        # The restart: a fresh engine on the same file (all that survives a SIGKILL).
        assert await sync_in_process(Path(config)) == ["ok"], f"{label}: restart failed"
        assert integrity(db_file) == "ok", label
        state = mirror_state(db_file)
        diff = {
            k: (state.get(k), scenario.reference.get(k))
            for k in state.keys() | scenario.reference.keys()
            if state.get(k) != scenario.reference.get(k)
        }
        assert not diff, f"{label}: mirror differs from the crash-free run: {diff}"
        assert_matches_world(state, scenario.sandbox.worlds, (scenario.platform,))
        killed = crashed.code == KILLED
        runs = runs_of(db_file)
        assert not [r for r in runs if r[1] == "running"], f"{label}: a run left running: {runs}"
        *before_restart, restarted = [r[1:] for r in runs if r[0] > scenario.template_runs]
        assert restarted == ("ok", None), label
        # The killed pass had not opened its run, or the restart closed it as interrupted,
        # or it was killed after closing it itself.
        allowed = [[], [("failed", INTERRUPTED)], [("ok", None)]] if killed else [[("ok", None)]]
        assert before_restart in allowed, f"{label}: {before_restart}"
        db_file.unlink()
        scenario.outcomes["killed" if killed else "completed"] += 1
        return killed


async def walk(scenario: Scenario, kind: str) -> int:
    """Kill at kind:1, kind:2, ... until a pass completes before the point; the kills."""
    kills, n = 0, 1
    while True:
        batch = range(n, n + PARALLEL)
        results = await asyncio.gather(*(crash_and_recover(scenario, f"{kind}:{i}") for i in batch))
        kills += sum(results)
        if not all(results):
            return kills
        n += PARALLEL


@pytest.mark.parametrize("platform", PLATFORMS, ids=lambda p: p.name)
async def test_sample_of_kill_points_converges(
    sandbox: Sandbox, tmp_path: Path, platform: Platform
) -> None:
    scenario = await prepare(sandbox, platform, tmp_path)
    points = ["statements:23", "commits:2", "requests:2"]
    results = await asyncio.gather(*(crash_and_recover(scenario, p) for p in points))
    assert all(results), "the hook did not kill the process where it should have"


@pytest.mark.reliability
@pytest.mark.timeout(600)
@pytest.mark.parametrize("platform", PLATFORMS, ids=lambda p: p.name)
async def test_every_kill_point_converges(
    sandbox: Sandbox, tmp_path: Path, platform: Platform
) -> None:
    scenario = await prepare(sandbox, platform, tmp_path)
    kills = {kind: await walk(scenario, kind) for kind in ("statements", "commits", "requests")}
    loop = asyncio.get_running_loop()
    started = loop.time()
    probe = scenario.tmp / "probe.db"
    copy_db(scenario.template, probe)
    assert (await syncd("sync", "--config", str(scenario.config(probe)))).code == 0
    clean_seconds = loop.time() - started
    rng = random.Random(f"{platform.name}-delays")
    delays = [rng.uniform(0.2, clean_seconds * 1.1) for _ in range(30)]
    timed = await asyncio.gather(*(crash_and_recover(scenario, d) for d in delays))
    kills["random_delay"] = sum(timed)
    record(f"crash.{platform.name}", **kills, completed=scenario.outcomes["completed"])
    assert kills["statements"] >= 20 and kills["commits"] >= 2 and kills["requests"] >= 2
