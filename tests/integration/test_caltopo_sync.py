"""CalTopo end to end: the engine syncing the sandbox over real HTTP into SQLite and PostgreSQL.

Why: these are the behaviours issue 2 promises users (incremental syncs, deletions on
proof only, partial deltas merged, failures isolated per map, nothing half-applied).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, func, select
from structlog.testing import capture_logs

from syncd.engine import Engine
from syncd.errors import ProtocolError
from syncd.http.document import JsonDocument
from syncd.logging import configure_logging
from syncd.mirror import Database
from syncd.mirror.models import changes
from syncd.sandbox.caltopo import CalTopoWorld, Fault, populate
from tests.conftest import Sandbox, mirror_rows, run_rows, stored_cursors

POINT = {"type": "Point", "coordinates": [-120.5, 39.25]}


def build_world(world: CalTopoWorld, maps: int = 2, objects: int = 8) -> None:
    populate(world, maps=maps, objects_per_map=objects, seed=3)


async def assert_mirrors_world(db: Database, source: str, world: CalTopoWorld) -> None:
    """Live rows equal the sandbox's live objects, map by map, field by field."""
    rows = await mirror_rows(db, source)
    live = [r for r in rows if r["deleted_at"] is None]
    for map_id in world.map_ids():
        expected = {}
        for (cls, obj_id), feature in world.live_objects(map_id).items():
            props = dict(feature["properties"])
            expected[(cls, obj_id)] = {
                "name": props.pop("title", None),
                "geometry": feature.get("geometry"),
                "properties": {k: v for k, v in props.items() if k != "class"},
            }
        actual = {
            (r["kind"], r["external_id"]): {
                "name": r["name"],
                "geometry": r["geometry"],
                "properties": r["properties"],
            }
            for r in live
            if r["collection"] == map_id
        }
        assert actual == expected, f"map {map_id} differs"
    mirrored_maps = {r["external_id"] for r in live if r["kind"] == "CollaborativeMap"}
    assert mirrored_maps == set(world.map_ids())
    live_collections = {r["collection"] for r in live} - {f"acct:{world.team_id}"}
    assert live_collections <= set(world.map_ids())


async def count_changes(db: Database) -> int:
    async with db.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(changes))).scalar_one())


async def test_first_sync_mirrors_everything(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    build_world(sandbox.caltopo, maps=3)
    outcome = await engine.sync(sandbox.caltopo_settings())
    assert outcome.status == "ok"
    assert outcome.requests == 4  # the account and three maps
    await assert_mirrors_world(db, "sar", sandbox.caltopo)
    rows = await mirror_rows(db, "sar")
    kinds = {r["kind"] for r in rows}
    assert {"CollaborativeMap", "UserFolder", "Marker", "Shape", "Folder", "AppTrack"} <= kinds
    cursors = await stored_cursors(db, "sar")
    assert set(cursors) == {"acct:TEAM01"} | {f"map:{m}" for m in sandbox.caltopo.map_ids()}
    run = (await run_rows(db))[-1]
    assert (run["status"], run["inserted"], run["requests"]) == ("ok", len(rows), 4)


async def test_second_sync_without_change_writes_nothing(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    build_world(sandbox.caltopo, maps=3)
    await engine.sync(sandbox.caltopo_settings())
    rows, n_changes = await mirror_rows(db, "sar"), await count_changes(db)
    sandbox.caltopo.request_log.clear()

    outcome = await engine.sync(sandbox.caltopo_settings())

    assert outcome.status == "ok"
    assert (outcome.inserted, outcome.updated, outcome.deleted) == (0, 0, 0)
    assert await mirror_rows(db, "sar") == rows
    assert await count_changes(db) == n_changes
    # One request per scope, each a `since/` with the stored cursor minus the overlap.
    log = sandbox.caltopo.request_log
    assert len(log) == 1 + len(sandbox.caltopo.map_ids())
    assert all(entry.status == 200 and entry.since and entry.since > 0 for entry in log)


async def test_edits_moves_and_deletions_appear(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.caltopo
    build_world(world)
    map_id = world.map_ids()[0]
    await engine.sync(sandbox.caltopo_settings())
    objects = [k for k in world.live_objects(map_id) if k[0] in ("Marker", "Shape")]
    (edit_cls, edit_id), (move_cls, move_id), (del_cls, del_id) = objects[:3]
    before = {(r["kind"], r["external_id"]): r for r in await mirror_rows(db, "sar")}

    world.edit_object(map_id, edit_cls, edit_id, {"title": "Renamed", "description": "new"})
    world.move_object(
        map_id,
        move_cls,
        move_id,
        {"type": "Point", "coordinates": [1.5, 2.5]}
        if move_cls == "Marker"
        else {"type": "LineString", "coordinates": [[1, 2], [3, 4]]},
    )
    world.delete_object(map_id, del_cls, del_id)
    new_id = world.add_object(map_id, "Marker", POINT, {"title": "New marker"})

    outcome = await engine.sync(sandbox.caltopo_settings())

    assert (outcome.inserted, outcome.updated, outcome.deleted) == (1, 2, 1)
    await assert_mirrors_world(db, "sar", world)
    after = {(r["kind"], r["external_id"]): r for r in await mirror_rows(db, "sar")}
    gone = after[(del_cls, del_id)]
    assert gone["deleted_at"] is not None
    assert gone["name"] == before[(del_cls, del_id)]["name"]  # soft delete keeps the data
    assert gone["geometry"] == before[(del_cls, del_id)]["geometry"]
    assert after[(edit_cls, edit_id)]["version"] == 2
    assert after[("Marker", new_id)]["name"] == "New marker"


async def test_deleted_map_tombstones_its_objects(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.caltopo
    build_world(world, maps=2)
    doomed, kept = world.map_ids()
    await engine.sync(sandbox.caltopo_settings())

    world.delete_map(doomed)
    with capture_logs() as logs:
        outcome = await engine.sync(sandbox.caltopo_settings())

    assert outcome.status == "ok"
    rows = await mirror_rows(db, "sar")
    on_doomed = [r for r in rows if r["collection"] == doomed]
    assert on_doomed and all(r["deleted_at"] is not None for r in on_doomed)
    assert all(r["deleted_at"] is None for r in rows if r["collection"] == kept)
    map_row = next(
        r for r in rows if r["kind"] == "CollaborativeMap" and r["external_id"] == doomed
    )
    assert map_row["deleted_at"] is not None
    assert f"map:{doomed}" not in await stored_cursors(db, "sar")
    assert any(e["event"] == "caltopo.map_gone" and e["map"] == doomed for e in logs)
    # The deleted map is no longer polled.
    assert not [e for e in world.request_log[-2:] if doomed in e.path]


async def test_full_resync_of_unchanged_world_changes_nothing(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    build_world(sandbox.caltopo)
    await engine.sync(sandbox.caltopo_settings())
    rows, n_changes = await mirror_rows(db, "sar"), await count_changes(db)
    sandbox.caltopo.request_log.clear()

    outcome = await engine.sync(sandbox.caltopo_settings(), full=True)

    assert outcome.status == "ok"
    assert outcome.unchanged == len(rows)
    assert await mirror_rows(db, "sar") == rows
    assert await count_changes(db) == n_changes
    assert {e.since for e in sandbox.caltopo.request_log} == {0}


async def test_full_resync_proves_deletions_without_ids(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    """A `since/0` answer is a complete listing, even if a delta's ids map was missed."""
    world = sandbox.caltopo
    build_world(world, maps=1)
    map_id = world.map_ids()[0]
    await engine.sync(sandbox.caltopo_settings())
    cls, obj_id = next(k for k in world.live_objects(map_id) if k[0] == "Marker")
    world.delete_object(map_id, cls, obj_id)

    await engine.sync(sandbox.caltopo_settings(), full=True)

    row = next(r for r in await mirror_rows(db, "sar") if r["external_id"] == obj_id)
    assert row["deleted_at"] is not None


async def test_failed_commit_keeps_cursor_and_next_sync_converges(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.caltopo
    build_world(world, maps=2)
    await engine.sync(sandbox.caltopo_settings())
    before_rows, before_cursors = await mirror_rows(db, "sar"), await stored_cursors(db, "sar")
    map_id = world.map_ids()[0]
    cls, obj_id = next(k for k in world.live_objects(map_id) if k[0] == "Marker")
    world.delete_object(map_id, cls, obj_id)
    world.add_object(map_id, "Marker", POINT, {"title": "after"})

    commits = 0

    def cut_power_at_first_map_commit(_conn: Any) -> None:
        nonlocal commits
        commits += 1
        if commits == 3:  # 1: the run row, 2: the account scope, 3: the first map
            raise RuntimeError("killed between writing rows and committing")

    event.listen(db.engine.sync_engine, "commit", cut_power_at_first_map_commit)
    try:
        outcome = await engine.sync(sandbox.caltopo_settings())
    finally:
        event.remove(db.engine.sync_engine, "commit", cut_power_at_first_map_commit)

    assert outcome.status == "failed"
    after_cursors = await stored_cursors(db, "sar")
    for map_scope in (s for s in before_cursors if s.startswith("map:")):
        assert after_cursors[map_scope] == before_cursors[map_scope]
    maps_only = [r for r in await mirror_rows(db, "sar") if not r["collection"].startswith("acct:")]
    assert maps_only == [r for r in before_rows if not r["collection"].startswith("acct:")]

    assert (await engine.sync(sandbox.caltopo_settings())).status == "ok"
    await assert_mirrors_world(db, "sar", world)


async def test_mass_delete_is_held_then_applied_with_override(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.caltopo
    map_id = world.add_map("Big search")
    ids = [world.add_object(map_id, "Marker", POINT, {"title": f"m{i}"}) for i in range(40)]
    await engine.sync(sandbox.caltopo_settings())
    before_rows, before_cursors = await mirror_rows(db, "sar"), await stored_cursors(db, "sar")
    for obj_id in ids[:36]:  # 90% of the map
        world.delete_object(map_id, "Marker", obj_id)

    with capture_logs() as logs:
        held = await engine.sync(sandbox.caltopo_settings())

    assert held.status == "partial"
    assert held.held == 36
    assert await mirror_rows(db, "sar") == before_rows
    assert (await stored_cursors(db, "sar"))[f"map:{map_id}"] == before_cursors[f"map:{map_id}"]
    [event_] = [e for e in logs if e["event"] == "sync.deletions_held"]
    assert (event_["scope"], event_["would_delete"], event_["live"]) == (f"map:{map_id}", 36, 40)
    assert (await run_rows(db))[-1]["status"] == "partial"

    applied = await engine.sync(sandbox.caltopo_settings(), allow_mass_delete=True)

    assert (applied.status, applied.deleted) == ("ok", 36)
    await assert_mirrors_world(db, "sar", world)


async def test_failing_map_tombstones_nothing_and_others_sync(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.caltopo
    build_world(world, maps=2)
    broken, healthy = world.map_ids()
    await engine.sync(sandbox.caltopo_settings())
    for cls, obj_id in list(world.live_objects(broken))[:3]:
        world.delete_object(broken, cls, obj_id)
    world.add_object(healthy, "Marker", POINT, {"title": "fresh"})
    world.add_fault(Fault(match=f"/map/{broken}/", status=500, times=-1))
    world.request_log.clear()

    with capture_logs() as logs:
        outcome = await engine.sync(sandbox.caltopo_settings(max_retries=2))

    assert outcome.status == "partial"
    assert outcome.failed_scopes == [f"map:{broken}"]
    rows = await mirror_rows(db, "sar")
    assert all(r["deleted_at"] is None for r in rows if r["collection"] == broken)
    assert any(r["name"] == "fresh" for r in rows if r["collection"] == healthy)
    assert len([e for e in world.request_log if broken in e.path]) == 3  # 1 + 2 retries
    assert [e["event"] for e in logs].count("http.retry") == 2
    failed = [e for e in logs if e["event"] == "scope.failed"]
    assert len(failed) == 1 and "HTTP 500" in failed[0]["error"]


async def test_geometry_only_update_keeps_title_and_properties(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.caltopo
    map_id = world.add_map("m")
    obj = world.add_object(
        map_id,
        "Marker",
        POINT,
        {"title": "Command post", "marker-color": "#00FF00", "description": "d"},
    )
    await engine.sync(sandbox.caltopo_settings())
    world.move_object(map_id, "Marker", obj, {"type": "Point", "coordinates": [-121.0, 40.0]})
    world.request_log.clear()

    await engine.sync(sandbox.caltopo_settings())

    row = next(r for r in await mirror_rows(db, "sar") if r["external_id"] == obj)
    assert row["name"] == "Command post"
    assert row["properties"]["marker-color"] == "#00FF00"
    assert row["properties"]["description"] == "d"
    assert row["geometry"] == {"type": "Point", "coordinates": [-121.0, 40.0]}
    assert row["version"] == 2


async def test_incremental_track_appends_only_newer_points(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.caltopo
    map_id = world.add_map("m")
    t0 = world.now()
    start = [[-120.0, 39.0, 0, t0], [-120.001, 39.001, 0, t0 + 1000]]
    track = world.add_object(
        map_id, "AppTrack", {"type": "LineString", "coordinates": start}, {"title": "Team 1"}
    )
    await engine.sync(sandbox.caltopo_settings())
    new_points = [[-120.002, 39.002, 0, t0 + 2000], [-120.003, 39.003, 0, t0 + 3000]]
    world.append_track_points(map_id, "AppTrack", track, new_points)

    await engine.sync(sandbox.caltopo_settings())
    await engine.sync(sandbox.caltopo_settings())  # re-reads the overlap window

    row = next(r for r in await mirror_rows(db, "sar") if r["external_id"] == track)
    assert row["geometry"]["coordinates"] == start + new_points
    assert "incremental" not in row["geometry"]
    assert row["name"] == "Team 1"


async def test_apptrack_becoming_shape_with_same_id(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.caltopo
    map_id = world.add_map("m")
    line = {"type": "LineString", "coordinates": [[-120.0, 39.0], [-120.1, 39.1]]}
    track = world.add_object(map_id, "AppTrack", line, {"title": "Team 2"})
    await engine.sync(sandbox.caltopo_settings())

    world.retype_object(map_id, "AppTrack", track, "Shape")
    await engine.sync(sandbox.caltopo_settings())

    rows = {r["kind"]: r for r in await mirror_rows(db, "sar") if r["external_id"] == track}
    assert set(rows) == {"AppTrack", "Shape"}
    assert rows["AppTrack"]["deleted_at"] is not None
    assert rows["Shape"]["deleted_at"] is None
    assert rows["Shape"]["geometry"] == line


async def test_unknown_classes_are_mirrored(sandbox: Sandbox, engine: Engine, db: Database) -> None:
    world = sandbox.caltopo
    map_id = world.add_map("m")
    world.add_object(map_id, "RangeRing", POINT, {"title": "Ring", "radius": 500})
    await engine.sync(sandbox.caltopo_settings())
    row = next(r for r in await mirror_rows(db, "sar") if r["kind"] == "RangeRing")
    assert row["properties"]["radius"] == 500


async def test_configured_maps_limit_polling(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.caltopo
    build_world(world, maps=3)
    chosen = world.map_ids()[1]
    await engine.sync(sandbox.caltopo_settings(maps=[chosen]))
    collections = {r["collection"] for r in await mirror_rows(db, "sar")}
    assert collections == {"acct:TEAM01", chosen}


async def test_bad_signature_is_an_auth_error_without_leaking(
    sandbox: Sandbox, db: Database
) -> None:
    world = sandbox.caltopo
    build_world(world, maps=1)
    wrong_secret = "dGFtcGVyZWQtc2VjcmV0LXZhbHVlLTEyMzQ1"  # valid base64, not the sandbox's
    settings = sandbox.caltopo_settings(credential_secret=wrong_secret)
    out = io.StringIO()
    configure_logging("debug", "json", stream=out)
    from syncd.redact import register_secrets

    register_secrets([wrong_secret])

    outcome = await Engine(db).sync(settings)

    assert outcome.status == "failed"
    assert world.request_log[-1].status == 401
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    failed = [e for e in lines if e["event"] == "sync.failed"]
    assert len(failed) == 1
    assert "HTTP 401" in failed[0]["error"] and "login required" in failed[0]["error"]
    text = out.getvalue() + (outcome.error or "")
    assert wrong_secret not in text
    assert "signature=***" in failed[0]["error"]
    assert "signature=" not in text.replace("signature=***", "")
    assert not any(e["event"] == "http.retry" for e in lines)  # auth errors are not retried


async def test_one_source_failing_does_not_stop_another(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    import asyncio

    build_world(sandbox.caltopo, maps=1)
    good = sandbox.caltopo_settings("good")
    bad = sandbox.caltopo_settings("bad", base_url="http://127.0.0.1:9/caltopo", max_retries=0)
    outcomes = await asyncio.gather(engine.sync(good), engine.sync(bad))
    assert [o.status for o in outcomes] == ["ok", "failed"]
    assert "connection failed" in (outcomes[1].error or "")
    await assert_mirrors_world(db, "good", sandbox.caltopo)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (Fault(match="/acct/", kind="empty", times=-1), "empty body"),
        (Fault(match="/acct/", kind="invalid_json", times=-1), "not JSON"),
    ],
)
async def test_malformed_account_answer_fails_the_source_cleanly(
    sandbox: Sandbox, engine: Engine, db: Database, fault: Fault, expected: str
) -> None:
    build_world(sandbox.caltopo, maps=1)
    await engine.sync(sandbox.caltopo_settings())
    before = await mirror_rows(db, "sar")
    sandbox.caltopo.add_fault(fault)
    outcome = await engine.sync(sandbox.caltopo_settings(), full=True)
    assert outcome.status == "failed"
    assert expected in (outcome.error or "")
    assert await mirror_rows(db, "sar") == before


async def test_one_large_map_of_many_deleted_is_applied(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    """Deleting one map is a small share of the account, however many objects it held."""
    world = sandbox.caltopo
    build_world(world, maps=5, objects=20)
    doomed = world.map_ids()[0]
    await engine.sync(sandbox.caltopo_settings())
    world.delete_map(doomed)
    other = world.map_ids()[1]
    world.rename_map(other, "Renamed meanwhile")

    outcome = await engine.sync(sandbox.caltopo_settings())

    assert (outcome.status, outcome.held) == ("ok", 0)
    assert outcome.deleted == 1 + 20
    await assert_mirrors_world(db, "sar", world)
    rows = await mirror_rows(db, "sar")
    assert any(r["external_id"] == other and r["name"] == "Renamed meanwhile" for r in rows)


async def test_every_map_gone_is_held(sandbox: Sandbox, engine: Engine, db: Database) -> None:
    """A credential that suddenly sees no map (revoked access) must not empty the mirror."""
    world = sandbox.caltopo
    build_world(world, maps=2, objects=8)
    await engine.sync(sandbox.caltopo_settings())
    before = await mirror_rows(db, "sar")
    for map_id in world.map_ids():
        world.delete_map(map_id)

    with capture_logs() as logs:
        outcome = await engine.sync(sandbox.caltopo_settings())

    assert outcome.status == "partial" and outcome.held > 10
    assert [e["scope"] for e in logs if e["event"] == "sync.deletions_held"] == ["acct:TEAM01"]
    assert await mirror_rows(db, "sar") == before


async def test_malformed_feature_in_a_full_listing_is_not_deleted(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    """A feature we cannot use is still present upstream: a since/0 answer must not
    count it as gone."""
    world = sandbox.caltopo
    map_id = world.add_map("m")
    obj = world.add_object(map_id, "Marker", POINT, {"title": "ok"})
    await engine.sync(sandbox.caltopo_settings())
    world.move_object(map_id, "Marker", obj, "not a geometry", geometry_only=False)  # type: ignore[arg-type]

    outcome = await engine.sync(sandbox.caltopo_settings(), full=True)

    row = next(r for r in await mirror_rows(db, "sar") if r["external_id"] == obj)
    assert row["deleted_at"] is None
    assert outcome.deleted == 0


async def test_configured_map_missing_from_account_is_not_flapping(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    """A map named in `maps` but not in the team's listing (e.g. only shared with it)
    is judged by its own answers, never deleted and restored pass after pass."""
    world = sandbox.caltopo
    build_world(world, maps=2)
    chosen = world.map_ids()[0]
    settings = sandbox.caltopo_settings(maps=[chosen])
    await engine.sync(settings)
    world.unlist_map(chosen)

    for _ in range(3):
        outcome = await engine.sync(settings, full=True)
        assert (outcome.status, outcome.deleted, outcome.restored) == ("ok", 1, 0) or (
            outcome.status,
            outcome.deleted,
            outcome.restored,
        ) == ("ok", 0, 0)
    rows = [r for r in await mirror_rows(db, "sar") if r["collection"] == chosen]
    assert rows and all(r["deleted_at"] is None and r["version"] == 1 for r in rows)


async def test_a_map_answer_breaking_while_applied_fails_only_its_scope(
    sandbox: Sandbox, engine: Engine, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Map answers stream into the mirror; one that breaks half-way (here: the spooled
    body becomes unreadable) is rolled back whole and the other maps still sync."""
    world = sandbox.caltopo
    build_world(world, maps=2)
    broken_map, good_map = world.map_ids()
    items = JsonDocument.items

    def breaking(self: JsonDocument, prefix: str) -> Iterator[Any]:
        for n, item in enumerate(items(self, prefix)):
            if broken_map in self.url and n == 2:
                raise ProtocolError(f"{self.url}: spooled body unreadable")
            yield item

    monkeypatch.setattr(JsonDocument, "items", breaking)
    with capture_logs() as logs:
        outcome = await engine.sync(sandbox.caltopo_settings())

    assert outcome.status == "partial"
    assert outcome.failed_scopes == [f"map:{broken_map}"]
    [failed] = [e for e in logs if e["event"] == "scope.failed"]
    assert "spooled body unreadable" in failed["error"]
    collections = {r["collection"] for r in await mirror_rows(db, "sar")}
    assert good_map in collections and broken_map not in collections
    assert (await stored_cursors(db, "sar"))[f"map:{broken_map}"] == "0"

    monkeypatch.setattr(JsonDocument, "items", items)
    assert (await engine.sync(sandbox.caltopo_settings())).status == "ok"
    await assert_mirrors_world(db, "sar", world)
