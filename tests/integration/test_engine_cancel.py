"""Cancelling a sync at any step leaves no run `running` and no half-applied scope.

Why: a daemon shutdown cancels in-flight syncs; a run row left `running` would show a
sync that never ends in `syncd status`, and a half-applied scope would break rule 1.
"""

from __future__ import annotations

import asyncio

from syncd.engine import Engine
from syncd.mirror import Database
from syncd.sandbox.caltopo import populate
from tests.conftest import Sandbox, mirror_rows, run_rows, stored_cursors


async def test_cancel_at_every_step(sandbox: Sandbox, engine: Engine, db: Database) -> None:
    populate(sandbox.caltopo, maps=2, objects_per_map=6, seed=4)
    settings = sandbox.caltopo_settings()
    steps = 0
    for _attempt in range(400):
        steps += 1 + steps // 8  # every early point, then ever sparser
        task = asyncio.create_task(engine.sync(settings, full=True))
        for _ in range(steps):  # let the sync advance exactly `steps` scheduler turns
            await asyncio.sleep(0)
        if task.done():
            break
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        runs = await run_rows(db)
        assert all(r["status"] != "running" for r in runs), runs[-1]
        # Every map is either wholly mirrored with its cursor, or not at all.
        cursors = await stored_cursors(db, "sar")
        rows = await mirror_rows(db, "sar")
        for map_id in sandbox.caltopo.map_ids():
            mirrored = [r for r in rows if r["collection"] == map_id]
            expected = len(sandbox.caltopo.live_objects(map_id))
            if cursors.get(f"map:{map_id}", "0") != "0":
                assert len(mirrored) == expected
            else:
                assert mirrored == []
    else:
        raise AssertionError("the sync never finished on its own")
    assert steps > 5
    assert (await task).status == "ok"
