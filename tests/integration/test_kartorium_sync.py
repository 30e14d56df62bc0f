"""Kartorium end to end: the engine syncing the sandbox over real HTTP into SQLite and PostgreSQL.

Why: issue 3 promises full listings made cheap, exact and safe: geometry from
positions and coordinate strings, deletions only on complete listings, failures
isolated per project, auth errors that name their cause, and no secret in any log.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import func, select
from structlog.testing import capture_logs

from syncd.engine import Engine
from syncd.mirror import Database
from syncd.mirror.models import changes
from syncd.sandbox.caltopo import Fault
from syncd.sandbox.kartorium import DEMO_KEY, KartoriumWorld
from tests.conftest import Sandbox, mirror_rows, run_rows, stored_cursors


def build_world(world: KartoriumWorld) -> dict[str, int]:
    """Two projects; the first has a Map scene with a marker, a line and a polygon."""
    p1 = world.add_project("Campus twin")
    map_scene = world.add_scene(p1, "Site map", "Map", description="field survey")
    tour = world.add_scene(p1, "Tour", "Virtual Tour")
    marker = world.add_feature(
        map_scene,
        "marker",
        "Service Point A",
        position=(-105.2705, 40.015, 0.0),
        props={"displayType": ("string", "label"), "size": ("integer", "0.07")},
    )
    line = world.add_feature(
        map_scene, "line", "Trench", coordinates=[[-105.2705, 40.015, 0], [-105.271, 40.016, 0]]
    )
    polygon = world.add_feature(
        map_scene,
        "polygon",
        "Lot",
        coordinates=[[-105.27, 40.01], [-105.26, 40.01], [-105.26, 40.02]],
        props={"inspection_notes": ("text", "Needs verification")},
    )
    p2 = world.add_project("Plant twin")
    s2 = world.add_scene(p2, "Plant", "Map")
    other = world.add_feature(s2, "marker", "Valve", position=(10.0, 50.0, 3.5))
    return {
        "p1": p1,
        "map_scene": map_scene,
        "tour": tour,
        "marker": marker,
        "line": line,
        "polygon": polygon,
        "p2": p2,
        "s2": s2,
        "other": other,
    }


def by_key(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["kind"], r["external_id"]): r for r in rows}


async def count_changes(db: Database) -> int:
    async with db.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(changes))).scalar_one())


async def test_first_sync_mirrors_projects_scenes_features(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    ids = build_world(sandbox.kartorium)
    with capture_logs() as logs:
        outcome = await engine.sync(sandbox.kartorium_settings())

    assert outcome.status == "ok"
    # projects + (scenes + features) per project + one properties request per feature
    assert outcome.requests == 1 + 2 * 2 + 4
    rows = by_key(await mirror_rows(db, "twin"))
    assert len(rows) == 2 + 3 + 4
    p1 = str(ids["p1"])
    assert rows[("project", p1)]["name"] == "Campus twin"
    assert rows[("project", p1)]["collection"] == p1
    scene = rows[("scene", str(ids["map_scene"]))]
    assert (scene["collection"], scene["name"]) == (p1, "Site map")
    assert scene["properties"]["type"] == "Map"
    assert scene["properties"]["description"] == "field survey"
    marker = rows[("feature", str(ids["marker"]))]
    assert marker["geometry"] == {"type": "Point", "coordinates": [-105.2705, 40.015, 0.0]}
    assert marker["properties"]["props"] == {
        "displayType": {"type": "string", "value": "label"},
        "size": {"type": "integer", "value": "0.07"},
    }
    assert marker["properties"]["type"] == "marker"
    line = rows[("feature", str(ids["line"]))]
    assert line["geometry"] == {
        "type": "LineString",
        "coordinates": [[-105.2705, 40.015, 0], [-105.271, 40.016, 0]],
    }
    assert "coordinateString" not in line["properties"]["props"]
    polygon = rows[("feature", str(ids["polygon"]))]
    ring = [[-105.27, 40.01], [-105.26, 40.01], [-105.26, 40.02], [-105.27, 40.01]]
    assert polygon["geometry"] == {"type": "Polygon", "coordinates": [ring]}  # closed
    assert rows[("feature", str(ids["other"]))]["collection"] == str(ids["p2"])
    cursors = await stored_cursors(db, "twin")
    assert set(cursors) == {f"project:{ids['p1']}", f"project:{ids['p2']}"}
    finished = [e for e in logs if e["event"] == "sync.finished"]
    assert len(finished) == 1 and finished[0]["requests"] == 9
    run = (await run_rows(db))[-1]
    assert (run["status"], run["inserted"], run["requests"]) == ("ok", 9, 9)


async def test_second_sync_without_change_writes_nothing(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    build_world(sandbox.kartorium)
    await engine.sync(sandbox.kartorium_settings())
    rows, n_changes = await mirror_rows(db, "twin"), await count_changes(db)

    outcome = await engine.sync(sandbox.kartorium_settings())

    assert outcome.status == "ok"
    assert (outcome.inserted, outcome.updated, outcome.deleted) == (0, 0, 0)
    assert await mirror_rows(db, "twin") == rows
    assert await count_changes(db) == n_changes


async def test_property_edit_updates_geometry_and_props(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.kartorium
    ids = build_world(world)
    await engine.sync(sandbox.kartorium_settings())

    world.set_property(ids["line"], "coordinateString", "[[1,2],[3,4],[5,6]]")
    world.set_property(ids["polygon"], "inspection_notes", "Verified")
    outcome = await engine.sync(sandbox.kartorium_settings())

    assert (outcome.inserted, outcome.updated, outcome.deleted) == (0, 2, 0)
    rows = by_key(await mirror_rows(db, "twin"))
    line = rows[("feature", str(ids["line"]))]
    assert line["geometry"] == {"type": "LineString", "coordinates": [[1, 2], [3, 4], [5, 6]]}
    assert line["version"] == 2
    notes = rows[("feature", str(ids["polygon"]))]["properties"]["props"]["inspection_notes"]
    assert notes == {"type": "text", "value": "Verified"}


async def test_deleted_feature_scene_and_project_are_tombstoned(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.kartorium
    ids = build_world(world)
    await engine.sync(sandbox.kartorium_settings())
    before = by_key(await mirror_rows(db, "twin"))

    world.delete_feature(ids["marker"])
    world.delete_scene(ids["tour"])
    world.delete_project(ids["p2"])
    with capture_logs() as logs:
        outcome = await engine.sync(sandbox.kartorium_settings())

    assert outcome.status == "ok"
    assert outcome.deleted == 1 + 1 + 3  # marker, tour, and project 2 with its scene and feature
    rows = by_key(await mirror_rows(db, "twin"))
    gone = [
        ("feature", str(ids["marker"])),
        ("scene", str(ids["tour"])),
        ("project", str(ids["p2"])),
        ("scene", str(ids["s2"])),
        ("feature", str(ids["other"])),
    ]
    for key in gone:
        assert rows[key]["deleted_at"] is not None, key
        assert rows[key]["name"] == before[key]["name"]  # soft delete keeps the data
    live = {k for k, r in rows.items() if r["deleted_at"] is None}
    assert live == set(rows) - set(gone)
    assert f"project:{ids['p2']}" not in await stored_cursors(db, "twin")
    assert any(e["event"] == "kartorium.project_gone" for e in logs)
    # The deleted project is no longer listed.
    assert not [e for e in world.request_log[-4:] if f"/projects/{ids['p2']}/" in e.path]


async def test_failed_feature_listing_tombstones_nothing_in_that_project(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.kartorium
    ids = build_world(world)
    await engine.sync(sandbox.kartorium_settings())
    world.delete_feature(ids["marker"])
    world.delete_scene(ids["tour"])
    world.delete_feature(ids["other"])
    new = world.add_feature(ids["s2"], "marker", "New valve", position=(11.0, 51.0, 0.0))
    world.add_fault(Fault(match=f"/projects/{ids['p1']}/features", status=503, times=-1))

    with capture_logs() as logs:
        outcome = await engine.sync(sandbox.kartorium_settings(max_retries=1))

    assert outcome.status == "partial"
    assert outcome.failed_scopes == [f"project:{ids['p1']}"]
    rows = by_key(await mirror_rows(db, "twin"))
    assert rows[("feature", str(ids["marker"]))]["deleted_at"] is None
    assert rows[("scene", str(ids["tour"]))]["deleted_at"] is None
    assert rows[("feature", str(ids["other"]))]["deleted_at"] is not None
    assert rows[("feature", str(new))]["name"] == "New valve"
    assert [e["scope"] for e in logs if e["event"] == "scope.failed"] == [f"project:{ids['p1']}"]


@pytest.mark.parametrize(
    ("scopes", "missing"),
    [
        ({"projects:read", "scenes:read"}, "features:read"),
        ({"projects:read", "features:read"}, "scenes:read"),
        ({"scenes:read", "features:read"}, "projects:read"),
    ],
)
async def test_key_without_a_read_scope_fails_naming_it(
    sandbox: Sandbox, engine: Engine, db: Database, scopes: set[str], missing: str
) -> None:
    world = sandbox.kartorium
    build_world(world)
    world.keys["karta_live_limited_key"] = frozenset(scopes)

    with capture_logs() as logs:
        outcome = await engine.sync(sandbox.kartorium_settings(api_key="karta_live_limited_key"))

    assert outcome.status == "failed"
    failed = [e for e in logs if e["event"] == "sync.failed"]
    assert len(failed) == 1
    assert f"lacks scope {missing}" in failed[0]["error"]
    assert not [e for e in logs if e["event"] == "http.retry"]  # an auth error is not retried
    assert "karta_live_limited_key" not in json.dumps(logs, default=str)


async def test_bad_key_fails_once_without_retry(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    build_world(sandbox.kartorium)
    with capture_logs() as logs:
        outcome = await engine.sync(sandbox.kartorium_settings(api_key="karta_live_wrong_key"))

    assert outcome.status == "failed"
    assert outcome.error is not None and "HTTP 401" in outcome.error
    assert [e["event"] for e in logs if e["event"].startswith("sync.")] == [
        "sync.started",
        "sync.failed",
    ]
    assert len(sandbox.kartorium.request_log) == 1
    assert await mirror_rows(db, "twin") == []


async def test_project_vanishing_mid_pass_is_not_a_crash(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.kartorium
    ids = build_world(world)
    await engine.sync(sandbox.kartorium_settings())
    world.add_fault(Fault(match=f"/projects/{ids['p2']}/scenes", status=404, times=1))

    with capture_logs() as logs:
        outcome = await engine.sync(sandbox.kartorium_settings())

    assert outcome.status == "ok"
    assert outcome.deleted == 0  # vanished is not yet proven gone
    assert any(e["event"] == "kartorium.project_vanished" for e in logs)


async def test_feature_vanishing_before_its_properties_is_kept_until_proven_gone(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.kartorium
    ids = build_world(world)
    await engine.sync(sandbox.kartorium_settings())
    rows = await mirror_rows(db, "twin")
    world.add_fault(Fault(match=f"/features/{ids['marker']}/properties", status=404, times=1))

    with capture_logs() as logs:
        outcome = await engine.sync(sandbox.kartorium_settings())

    assert (outcome.status, outcome.deleted) == ("ok", 0)
    assert await mirror_rows(db, "twin") == rows
    vanished = [e for e in logs if e["event"] == "kartorium.feature_vanished"]
    assert [e["feature"] for e in vanished] == [str(ids["marker"])]
    # Not remembered as fetched: the next pass reads its properties again.
    world.request_log.clear()
    await engine.sync(sandbox.kartorium_settings(properties_recheck_every=50))
    assert world.requests_to(f"/features/{ids['marker']}/properties") == 1


async def test_bad_request_is_a_protocol_error_of_that_project(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.kartorium
    ids = build_world(world)
    world.add_fault(Fault(match=f"/projects/{ids['p2']}/features", status=400, times=-1))

    outcome = await engine.sync(sandbox.kartorium_settings())

    assert outcome.status == "partial"
    assert world.requests_to(f"/projects/{ids['p2']}/features") == 1  # 400 is not retried
    rows = by_key(await mirror_rows(db, "twin"))
    assert ("scene", str(ids["s2"])) not in rows  # the failed project wrote nothing
    assert ("feature", str(ids["marker"])) in rows


async def test_property_cache_saves_requests_and_still_converges(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.kartorium
    ids = build_world(world)
    settings = sandbox.kartorium_settings(properties_recheck_every=4)
    first = await engine.sync(settings)
    assert first.requests == 9

    # The feature row changed: its properties are re-read at once.
    world.edit_feature(ids["polygon"], name="Lot 7")
    world.set_property(ids["polygon"], "inspection_notes", "Seen with the rename")
    world.request_log.clear()
    second = await engine.sync(settings)
    assert world.requests_to(f"/features/{ids['polygon']}/properties") == 1
    assert second.requests < 9
    row = by_key(await mirror_rows(db, "twin"))[("feature", str(ids["polygon"]))]
    assert row["name"] == "Lot 7"
    assert row["properties"]["props"]["inspection_notes"]["value"] == "Seen with the rename"

    # A property-only edit is invisible in the listing; the rotating recheck finds it
    # within properties_recheck_every passes.
    world.set_property(ids["line"], "coordinateString", "[[7,8],[9,10]]")
    world.request_log.clear()
    totals = []
    for _ in range(4):
        totals.append((await engine.sync(settings)).requests)
    row = by_key(await mirror_rows(db, "twin"))[("feature", str(ids["line"]))]
    assert row["geometry"] == {"type": "LineString", "coordinates": [[7, 8], [9, 10]]}
    # Every feature's properties were read exactly once over the four passes.
    assert world.requests_to("/properties") == 4
    assert sum(totals) == 4 * 5 + 4


async def test_full_resync_rereads_every_property(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.kartorium
    build_world(world)
    settings = sandbox.kartorium_settings(properties_recheck_every=100)
    await engine.sync(settings)
    world.request_log.clear()

    outcome = await engine.sync(settings, full=True)

    assert outcome.requests == 9
    assert outcome.unchanged == 9


async def test_data_envelope_and_project_filter(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.kartorium
    world.envelope = "data"
    ids = build_world(world)

    outcome = await engine.sync(sandbox.kartorium_settings(projects=[ids["p2"]]))

    assert outcome.status == "ok"
    rows = await mirror_rows(db, "twin")
    assert {r["collection"] for r in rows} == {str(ids["p2"])}
    assert len(rows) == 3


async def test_invalid_geometry_keeps_feature_and_logs_once(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.kartorium
    ids = build_world(world)
    world.set_property(ids["line"], "coordinateString", "[[1,2],[3")
    bad = world.add_feature(ids["s2"], "marker", "Bad", position=[1.0, 2.0])

    with capture_logs() as logs:
        outcome = await engine.sync(sandbox.kartorium_settings())

    assert outcome.status == "ok"
    rows = by_key(await mirror_rows(db, "twin"))
    assert rows[("feature", str(ids["line"]))]["geometry"] is None
    assert rows[("feature", str(bad))]["geometry"] is None
    assert rows[("feature", str(bad))]["name"] == "Bad"
    events = [e for e in logs if e["event"] == "record.invalid_geometry"]
    assert sorted(e["id"] for e in events) == sorted([str(ids["line"]), str(bad)])
    assert all(e["source"] == "twin" and e["reason"] for e in events)


async def test_api_key_never_logged_nor_in_urls(
    sandbox: Sandbox, engine: Engine, db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    world = sandbox.kartorium
    ids = build_world(world)
    world.add_fault(Fault(match=f"/projects/{ids['p1']}/features", status=500, times=-1))
    await engine.sync(sandbox.kartorium_settings(max_retries=1))
    out = capsys.readouterr()
    assert "http.retry" in out.out
    assert DEMO_KEY not in out.out + out.err
    assert all("api_key" not in e.path for e in world.request_log)
    runs = await run_rows(db)
    assert DEMO_KEY not in json.dumps(runs, default=str)


async def test_failing_property_read_fails_only_that_project(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    world = sandbox.kartorium
    ids = build_world(world)
    await engine.sync(sandbox.kartorium_settings())
    world.delete_scene(ids["tour"])
    world.edit_feature(ids["other"], name="Valve 2")
    world.add_fault(Fault(match=f"/features/{ids['line']}/properties", status=500, times=-1))

    outcome = await engine.sync(sandbox.kartorium_settings(max_retries=1))

    assert outcome.status == "partial"
    assert outcome.failed_scopes == [f"project:{ids['p1']}"]
    rows = by_key(await mirror_rows(db, "twin"))
    assert rows[("scene", str(ids["tour"]))]["deleted_at"] is None
    assert rows[("feature", str(ids["other"]))]["name"] == "Valve 2"


async def test_every_project_gone_is_held_for_an_operator(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    """A key that suddenly sees no project (revoked access) must not empty the mirror."""
    world = sandbox.kartorium
    ids = build_world(world)
    for i in range(12):
        world.add_feature(ids["s2"], "marker", f"Valve {i}", position=(10.0, 50.0 + i / 100, 0))
    await engine.sync(sandbox.kartorium_settings())
    total = len(await mirror_rows(db, "twin"))
    world.delete_project(ids["p1"])
    world.delete_project(ids["p2"])

    with capture_logs() as logs:
        held = await engine.sync(sandbox.kartorium_settings())

    assert held.status == "partial" and held.held == total
    assert [e["scope"] for e in logs if e["event"] == "sync.deletions_held"] == ["projects"]
    rows = await mirror_rows(db, "twin")
    assert all(r["deleted_at"] is None for r in rows)

    allowed = await engine.sync(sandbox.kartorium_settings(), allow_mass_delete=True)
    assert allowed.deleted == total


async def test_one_large_project_of_several_gone_is_applied(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    """The guard weighs the share of projects lost; a project's contents follow it."""
    world = sandbox.kartorium
    ids = build_world(world)
    world.add_project("Third twin")
    for i in range(12):
        world.add_feature(ids["s2"], "marker", f"Valve {i}", position=(10.0, 50.0 + i / 100, 0))
    big = world.add_scene(ids["p1"], "Survey", "Map")
    for i in range(30):
        world.add_feature(big, "marker", f"Post {i}", position=(-105.0, 40.0 + i / 100, 0))
    await engine.sync(sandbox.kartorium_settings())
    world.delete_project(ids["p2"])

    outcome = await engine.sync(sandbox.kartorium_settings())

    assert (outcome.status, outcome.held, outcome.deleted) == ("ok", 0, 1 + 1 + 13)
