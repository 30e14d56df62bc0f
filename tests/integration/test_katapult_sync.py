"""Katapult Pro end to end: the engine syncing the sandbox over real HTTP (SQLite, PostgreSQL).

Why: issue 4 promises jobs and their entities mirrored at the full permitted rate,
never tripping the 50 ms rule or the token bucket, deletions only on proof, and
unchanged jobs not re-read.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from sqlalchemy import func, select

from syncd.engine import Engine
from syncd.mirror import Database
from syncd.mirror.models import changes
from syncd.sandbox.katapult import KatapultWorld, populate
from tests.conftest import Sandbox, mirror_rows, stored_cursors

KINDS = {"job", "node", "connection", "section", "photo", "trace"}


async def count_changes(db: Database) -> int:
    async with db.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(changes))).scalar_one())


def live(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["kind"], r["external_id"]): r for r in rows if r["deleted_at"] is None}


def expected_keys(world: KatapultWorld, job_id: str) -> set[tuple[str, str]]:
    job = world.jobs[job_id]
    keys = {("job", job_id)}
    keys |= {("node", n) for n in job.nodes}
    keys |= {("connection", c) for c in job.connections}
    keys |= {("section", s) for c in job.connections.values() for s in c["sections"]}
    keys |= {("photo", p) for p in job.photos}
    keys |= {("trace", t) for t in job.traces}
    return keys


def assert_paced(world: KatapultWorld) -> None:
    """No 429 answered, and no two arrivals closer than the server's 50 ms rule."""
    statuses = [r.status for r in world.request_log]
    assert 429 not in statuses
    gaps = [b.at - a.at for a, b in pairwise(world.request_log)]
    assert not gaps or min(gaps) >= world.min_interval, (
        f"closest arrivals {min(gaps) * 1000:.2f} ms"
    )


async def test_full_job_sync(sandbox: Sandbox, engine: Engine, db: Database) -> None:
    world = sandbox.katapult
    jobs = populate(world, jobs=2, poles=4, seed=5)

    outcome = await engine.sync(sandbox.katapult_settings())

    assert outcome.status == "ok", outcome.error
    assert outcome.requests == 1 + 5 * len(jobs)
    rows = live(await mirror_rows(db, "poles"))
    for job_id in jobs:
        assert {k for k, r in rows.items() if r["collection"] == job_id} == expected_keys(
            world, job_id
        )
    assert {kind for kind, _ in rows} == KINDS
    job = world.jobs[jobs[0]]
    node_id, node = next(iter(job.nodes.items()))
    row = rows["node", node_id]
    assert row["geometry"] == {
        "type": "Point",
        "coordinates": [node["longitude"], node["latitude"]],
    }
    assert row["properties"]["attributes"]["node_type"] == "pole"
    conn_id, conn = next(iter(job.connections.items()))
    ends = [job.nodes[conn[k]] for k in ("node_id_1", "node_id_2")]
    assert rows["connection", conn_id]["geometry"] == {
        "type": "LineString",
        "coordinates": [[n["longitude"], n["latitude"]] for n in ends],
    }
    section_id = next(iter(conn["sections"]))
    assert rows["section", section_id]["properties"]["connection_id"] == conn_id
    assert rows["job", jobs[0]]["name"] == "Sandbox Pole Survey 1"
    assert rows["job", jobs[0]]["properties"]["metadata"]["city"] == "Buffalo"
    cursors = await stored_cursors(db, "poles")
    assert set(cursors) == {f"job:{j}" for j in jobs}
    assert_paced(world)


async def test_second_sync_without_change_writes_nothing(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.katapult
    populate(world, jobs=3, poles=4, seed=5)
    await engine.sync(sandbox.katapult_settings())
    rows, n_changes = await mirror_rows(db, "poles"), await count_changes(db)
    world.request_log.clear()

    outcome = await engine.sync(sandbox.katapult_settings())

    assert outcome.status == "ok"
    assert (outcome.inserted, outcome.updated, outcome.deleted) == (0, 0, 0)
    assert await mirror_rows(db, "poles") == rows
    assert await count_changes(db) == n_changes
    # Only the job list: every job's `last_updated` is unchanged.
    assert [r.path.rsplit("/v3", 1)[1] for r in world.request_log] == ["/jobs"]


async def test_full_reconcile_without_change_writes_nothing(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    populate(sandbox.katapult, jobs=2, poles=3, seed=5)
    await engine.sync(sandbox.katapult_settings())
    rows = await mirror_rows(db, "poles")

    outcome = await engine.sync(sandbox.katapult_settings(full_every=0))

    assert outcome.requests == 11
    assert (outcome.inserted, outcome.updated, outcome.deleted) == (0, 0, 0)
    assert await mirror_rows(db, "poles") == rows
