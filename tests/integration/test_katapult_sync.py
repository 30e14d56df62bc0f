"""Katapult Pro end to end: the engine syncing the sandbox over real HTTP (SQLite, PostgreSQL).

Why: issue 4 promises jobs and their entities mirrored at the full permitted rate,
never tripping the 50 ms rule or the token bucket, deletions only on proof, and
unchanged jobs not re-read.
"""

from __future__ import annotations

import json
from itertools import pairwise
from typing import Any

from sqlalchemy import func, select
from structlog.testing import capture_logs

from syncd.engine import Engine
from syncd.logging import configure_logging
from syncd.mirror import Database
from syncd.mirror.models import changes
from syncd.sandbox.caltopo import Fault
from syncd.sandbox.katapult import KatapultWorld, populate
from tests.conftest import Sandbox, mirror_rows, run_rows, stored_cursors

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

    sandbox.katapult.request_log.clear()
    outcome = await engine.sync(sandbox.katapult_settings(full_every=0))

    # Every job read in full again: the list, then 5 listings per job. (Counted from
    # the sandbox's answers: a GC pause can stall this in-process server's clock.)
    answered = [r for r in sandbox.katapult.request_log if r.status == 200]
    assert len(answered) == 11
    assert (outcome.inserted, outcome.updated, outcome.deleted) == (0, 0, 0)
    assert await mirror_rows(db, "poles") == rows


async def test_moved_node_updates_its_point_and_its_connections(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.katapult
    job_id = populate(world, jobs=1, poles=3, seed=5)[0]
    await engine.sync(sandbox.katapult_settings())
    job = world.jobs[job_id]
    middle = list(job.nodes)[1]
    touching = [c for c, conn in job.connections.items() if middle in conn.values()]
    assert len(touching) == 2

    world.move_node(job_id, middle, 42.5, -78.5)
    outcome = await engine.sync(sandbox.katapult_settings())

    assert (outcome.inserted, outcome.updated, outcome.deleted) == (0, 3, 0)
    rows = live(await mirror_rows(db, "poles"))
    assert rows["node", middle]["geometry"] == {"type": "Point", "coordinates": [-78.5, 42.5]}
    for conn_id in touching:
        assert [-78.5, 42.5] in rows["connection", conn_id]["geometry"]["coordinates"]


async def test_deleted_node_connection_and_job_are_tombstoned(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.katapult
    keep, gone, other = populate(world, jobs=3, poles=3, seed=5)
    settings = sandbox.katapult_settings()  # one job of three is no mass delete
    await engine.sync(settings)
    job = world.jobs[keep]
    first_node = next(iter(job.nodes))
    conn_of_node = next(c for c, conn in job.connections.items() if first_node in conn.values())
    lone_conn = next(c for c in job.connections if c != conn_of_node)
    lone_sections = set(job.connections[lone_conn]["sections"])
    world.delete_node(keep, first_node)  # cascades to its connection (and that one's section)
    world.delete_connection(keep, lone_conn)
    world.delete_job(gone)

    with capture_logs() as logs:
        outcome = await engine.sync(settings)

    assert outcome.status == "ok", outcome.error
    rows = await mirror_rows(db, "poles")
    dead = {(r["kind"], r["external_id"]) for r in rows if r["deleted_at"] is not None}
    assert ("node", first_node) in dead
    assert {("connection", conn_of_node), ("connection", lone_conn)} <= dead
    assert {("section", s) for s in lone_sections} <= dead
    gone_rows = [r for r in rows if r["collection"] == gone]
    assert gone_rows and all(r["deleted_at"] is not None for r in gone_rows)
    assert live(rows).keys() == expected_keys(world, keep) | expected_keys(world, other)
    assert f"job:{gone}" not in await stored_cursors(db, "poles")
    assert any(e["event"] == "katapult.job_gone" for e in logs)
    assert not any(e["event"] == "sync.deletions_held" for e in logs)


async def test_most_jobs_gone_at_once_are_held_together(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    """Jobs gone in one pass are weighed together: 3 of 4 is a mass delete, although
    each alone is no more than half of what the others would leave (issue 6 review)."""
    world = sandbox.katapult
    _, *doomed = populate(world, jobs=4, poles=3, seed=5)
    await engine.sync(sandbox.katapult_settings())
    before = await mirror_rows(db, "poles")
    for job_id in doomed:
        world.delete_job(job_id)

    held = await engine.sync(sandbox.katapult_settings())

    assert held.status == "partial"
    assert held.held == sum(1 for r in before if r["collection"] in doomed)
    assert await mirror_rows(db, "poles") == before


async def test_the_only_job_gone_is_held_as_a_mass_delete(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    """A job gone from the list is a cascade, weighed against the whole source as a map
    gone from a CalTopo account is: losing everything (a revoked key) waits for an operator."""
    world = sandbox.katapult
    [only] = populate(world, jobs=1, poles=3, seed=5)
    await engine.sync(sandbox.katapult_settings())
    before = await mirror_rows(db, "poles")
    world.delete_job(only)

    with capture_logs() as logs:
        held = await engine.sync(sandbox.katapult_settings())

    assert (held.status, held.held) == ("partial", len(before))
    assert await mirror_rows(db, "poles") == before
    assert [e["scope"] for e in logs if e["event"] == "sync.deletions_held"] == ["jobs"]
    applied = await engine.sync(sandbox.katapult_settings(), allow_mass_delete=True)
    assert (applied.status, applied.deleted) == ("ok", len(before))


async def test_failed_nodes_listing_tombstones_nothing(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.katapult
    broken, healthy = populate(world, jobs=2, poles=3, seed=5)
    await engine.sync(sandbox.katapult_settings())
    before = await mirror_rows(db, "poles")
    cursors = await stored_cursors(db, "poles")
    for job_id in (broken, healthy):
        job = world.jobs[job_id]
        world.delete_connection(job_id, next(iter(job.connections)))
    world.faults.append(Fault(match=f"/jobs/{broken}/nodes", status=500, times=-1))

    with capture_logs() as logs:
        outcome = await engine.sync(sandbox.katapult_settings())

    assert outcome.status == "partial"
    assert outcome.failed_scopes == [f"job:{broken}"]
    rows = await mirror_rows(db, "poles")
    broken_rows = [r for r in rows if r["collection"] == broken]
    assert broken_rows == [r for r in before if r["collection"] == broken]
    assert (await stored_cursors(db, "poles"))[f"job:{broken}"] == cursors[f"job:{broken}"]
    # The healthy job still syncs: its deleted connection and section are tombstoned.
    assert outcome.deleted == 2
    assert any(e["event"] == "scope.failed" and broken in e["scope"] for e in logs)


async def test_archived_job_keeps_its_rows(sandbox: Sandbox, engine: Engine, db: Database) -> None:
    world = sandbox.katapult
    job_id = populate(world, jobs=1, poles=3, seed=5)[0]
    await engine.sync(sandbox.katapult_settings())
    world.set_status(job_id, "archived")

    outcome = await engine.sync(sandbox.katapult_settings())
    world.request_log.clear()
    again = await engine.sync(sandbox.katapult_settings())

    assert (outcome.updated, outcome.deleted) == (1, 0)
    rows = live(await mirror_rows(db, "poles"))
    assert rows.keys() == expected_keys(world, job_id)
    assert rows["job", job_id]["properties"]["status"] == "archived"
    # Known archived: not asked about again until its next full reconcile.
    assert (again.requests, again.updated) == (1, 0)


async def test_unstamped_job_is_probed_through_its_nodes(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.katapult
    job_id = populate(world, jobs=1, poles=3, seed=5)[0]
    world.jobs[job_id].stamped = False
    await engine.sync(sandbox.katapult_settings())
    world.request_log.clear()

    quiet = await engine.sync(sandbox.katapult_settings())
    probe = world.request_log[-1]
    node_id = next(iter(world.jobs[job_id].nodes))
    world.move_node(job_id, node_id, 42.0, -78.0)
    moved = await engine.sync(sandbox.katapult_settings())

    assert quiet.requests == 2 and quiet.updated == 0
    assert probe.path.endswith(f"/jobs/{job_id}/nodes")
    assert probe.query["limit"] == "1" and probe.query["last_updated"]
    assert moved.requests == 2 + 5 and moved.updated >= 1
    node = live(await mirror_rows(db, "poles"))["node", node_id]
    assert node["geometry"]["coordinates"] == [-78.0, 42.0]


async def test_many_jobs_are_paced_without_a_single_429(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.katapult
    populate(world, jobs=6, poles=3, seed=9)

    outcome = await engine.sync(sandbox.katapult_settings(concurrency=8))

    assert outcome.status == "ok"
    assert len(world.request_log) == 1 + 6 * 5
    assert_paced(world)


async def test_small_bucket_waits_for_the_refill_instead_of_429(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.katapult
    # 16 GETs at 20/s from a bucket of 4 refilled every 0.5 s: at least two refills
    # must be waited for (the production period is 60 s; the option exists for this).
    world.allotment = world.tokens = 4
    world.refill_period = 0.5
    jobs = populate(world, jobs=3, poles=2, seed=5)

    with capture_logs() as logs:
        outcome = await engine.sync(sandbox.katapult_settings(token_refill_period=0.5))

    assert outcome.status == "ok", outcome.error
    assert outcome.requests == 1 + 5 * len(jobs)
    assert [r.status for r in world.request_log] == [200] * outcome.requests
    waits = [e for e in logs if e["event"] == "ratelimit.wait"]
    assert len(waits) >= 2
    assert all(e["reason"] == "token_bucket" and 0 < e["wait_ms"] <= 600 for e in waits)
    assert not [e for e in logs if e["event"] == "http.retry"]


async def test_api_key_never_reaches_the_logs(
    sandbox: Sandbox, engine: Engine, db: Database, capsys: Any
) -> None:
    world = sandbox.katapult
    job_id = populate(world, jobs=1, poles=2, seed=5)[0]
    world.faults.append(Fault(match=f"/jobs/{job_id}/traces", status=503, times=-1))
    configure_logging("debug", "json")

    outcome = await engine.sync(sandbox.katapult_settings(max_retries=1))

    assert outcome.status == "partial"
    out = capsys.readouterr().out
    assert "http.retry" in out and "api_key=***" in out
    assert world.api_key not in out
    run = (await run_rows(db))[-1]
    assert world.api_key not in (run["error"] or "")


async def test_revoked_key_fails_the_source_with_one_clear_line(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    populate(sandbox.katapult, jobs=1, poles=2, seed=5)

    with capture_logs() as logs:
        outcome = await engine.sync(sandbox.katapult_settings(api_key="not-the-key-at-all"))

    assert outcome.status == "failed"
    assert "401" in (outcome.error or "") and "INVALID API KEY" in (outcome.error or "")
    assert "not-the-key-at-all" not in json.dumps(logs)
    assert await mirror_rows(db, "poles") == []
