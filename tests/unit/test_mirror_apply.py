"""Mirror.apply on SQLite and PostgreSQL: upsert by hash, tombstone on proof only, guard, cursors.

Why: these are the correctness rules of ARCHITECTURE.md §1; every test here fails if
one of them breaks, on either backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.dialects import sqlite as sqlite_dialect
from structlog.testing import capture_logs

from syncd.errors import ProtocolError
from syncd.mirror import Database, DeleteGuard, Mirror
from syncd.mirror import apply as apply_module
from syncd.mirror.models import UtcDateTime, changes
from syncd.records import KEEP, Listing, Record, Snapshot
from tests.conftest import mirror_rows, stored_cursors

SRC = "src"


def marker(external_id: str, title: str = "m", lon: float = 1.0, **props: Any) -> Record:
    return Record(
        kind="Marker",
        external_id=external_id,
        collection="map1",
        name=title,
        geometry={"type": "Point", "coordinates": [lon, 2.0]},
        properties={"marker-color": "#FF0000", **props},
    )


def complete(*ids: str, collection: str = "map1") -> tuple[Listing, ...]:
    return (Listing(frozenset({collection}), frozenset((collection, "Marker", i) for i in ids)),)


async def change_log(db: Database) -> list[tuple[int, str, int]]:
    async with db.read() as conn:
        rows = await conn.execute(
            select(changes.c.feature_id, changes.c.op, changes.c.version).order_by(changes.c.seq)
        )
        return [tuple(r) for r in rows]


def by_id(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["external_id"]: r for r in rows}


async def test_insert_then_identical_snapshot_writes_nothing(db: Database) -> None:
    mirror = Mirror(db)
    first = await mirror.apply(SRC, Snapshot("map:map1", [marker("a"), marker("b")], cursor="10"))
    assert (first.inserted, first.unchanged) == (2, 0)
    before_rows, before_log = await mirror_rows(db), await change_log(db)

    again = await mirror.apply(SRC, Snapshot("map:map1", [marker("a"), marker("b")], cursor="20"))

    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 2)
    assert await mirror_rows(db) == before_rows  # not even updated_at moved
    assert await change_log(db) == before_log
    assert await stored_cursors(db, SRC) == {"map:map1": "20"}


async def test_update_bumps_version_and_appends_change(db: Database) -> None:
    mirror = Mirror(db)
    await mirror.apply(SRC, Snapshot("s", [marker("a", title="old")]))
    result = await mirror.apply(SRC, Snapshot("s", [marker("a", title="new", lon=5.0)]))
    row = (await mirror_rows(db))[0]
    assert result.updated == 1
    assert row["name"] == "new"
    assert row["geometry"] == {"type": "Point", "coordinates": [5.0, 2.0]}
    assert row["version"] == 2
    assert [op for _, op, _ in await change_log(db)] == ["insert", "update"]


async def test_tombstone_only_with_a_complete_listing(db: Database) -> None:
    mirror = Mirror(db)
    await mirror.apply(SRC, Snapshot("s", [marker("a"), marker("b"), marker("c")]))

    # A delta without a listing proves nothing about "b" and "c".
    await mirror.apply(SRC, Snapshot("s", [marker("a", title="edited")]))
    assert all(r["deleted_at"] is None for r in await mirror_rows(db))

    result = await mirror.apply(SRC, Snapshot("s", [], listings=complete("a", "c")))
    rows = by_id(await mirror_rows(db))
    assert result.deleted == 1
    assert rows["b"]["deleted_at"] is not None
    assert rows["b"]["name"] == "m"  # soft delete: the data stays
    assert rows["b"]["version"] == 2
    assert rows["a"]["deleted_at"] is None and rows["c"]["deleted_at"] is None


async def test_listing_limited_to_its_collection_and_kinds(db: Database) -> None:
    mirror = Mirror(db)
    other = Record(kind="Shape", external_id="s1", collection="map1", name="s")
    elsewhere = Record(kind="Marker", external_id="x", collection="map2", name="x")
    await mirror.apply(SRC, Snapshot("s", [marker("a"), other, elsewhere]))

    listing = Listing(frozenset({"map1"}), frozenset(), kinds=frozenset({"Marker"}))
    await mirror.apply(SRC, Snapshot("s", [], listings=(listing,)))

    rows = by_id(await mirror_rows(db))
    assert rows["a"]["deleted_at"] is not None
    assert rows["s1"]["deleted_at"] is None  # other kind
    assert rows["x"]["deleted_at"] is None  # other collection


async def test_other_sources_are_never_touched(db: Database) -> None:
    mirror = Mirror(db)
    await mirror.apply("one", Snapshot("s", [marker("a")]))
    await mirror.apply("two", Snapshot("s", [], listings=complete()))
    assert (await mirror_rows(db, "one"))[0]["deleted_at"] is None


async def test_reappearing_object_is_restored(db: Database) -> None:
    mirror = Mirror(db)
    await mirror.apply(SRC, Snapshot("s", [marker("a"), marker("b")]))
    await mirror.apply(SRC, Snapshot("s", [], listings=complete("b")))
    result = await mirror.apply(SRC, Snapshot("s", [marker("a")]))
    row = by_id(await mirror_rows(db))["a"]
    assert result.restored == 1
    assert row["deleted_at"] is None
    assert row["version"] == 3
    assert [op for _, op, _ in await change_log(db)][-2:] == ["delete", "restore"]


async def test_explicit_deletions(db: Database) -> None:
    mirror = Mirror(db)
    await mirror.apply(SRC, Snapshot("s", [marker("a"), marker("b")]))
    result = await mirror.apply(
        SRC,
        Snapshot("s", [], deleted=frozenset({("map1", "Marker", "a"), ("map1", "Marker", "zz")})),
    )
    rows = by_id(await mirror_rows(db))
    assert result.deleted == 1
    assert rows["a"]["deleted_at"] is not None and rows["b"]["deleted_at"] is None


async def test_partial_delta_keeps_name_and_properties(db: Database) -> None:
    mirror = Mirror(db)
    await mirror.apply(SRC, Snapshot("s", [marker("a", title="Base camp", symbol="tent")]))
    moved = Record(
        kind="Marker",
        external_id="a",
        collection="map1",
        name=KEEP,
        geometry={"type": "Point", "coordinates": [9.0, 9.0]},
        properties=KEEP,
    )
    await mirror.apply(SRC, Snapshot("s", [moved]))
    row = (await mirror_rows(db))[0]
    assert row["name"] == "Base camp"
    assert row["properties"] == {"marker-color": "#FF0000", "symbol": "tent"}
    assert row["geometry"]["coordinates"] == [9.0, 9.0]


async def test_missing_geometry_keeps_stored_geometry(db: Database) -> None:
    mirror = Mirror(db)
    await mirror.apply(SRC, Snapshot("s", [marker("a", lon=3.0)]))
    renamed = Record(
        kind="Marker",
        external_id="a",
        collection="map1",
        name="renamed",
        geometry=KEEP,
        properties={},
    )
    await mirror.apply(SRC, Snapshot("s", [renamed]))
    row = (await mirror_rows(db))[0]
    assert row["name"] == "renamed"
    assert row["geometry"] == {"type": "Point", "coordinates": [3.0, 2.0]}


async def test_incremental_track_appends_only_newer_points(db: Database) -> None:
    mirror = Mirror(db)
    track = Record(
        kind="AppTrack",
        external_id="t",
        collection="map1",
        name="Searcher",
        geometry={"type": "LineString", "coordinates": [[0, 0, 0, 100], [1, 1, 0, 200]]},
    )
    await mirror.apply(SRC, Snapshot("s", [track]))
    delta = Record(
        kind="AppTrack",
        external_id="t",
        collection="map1",
        name=KEEP,
        properties=KEEP,
        geometry={
            "type": "LineString",
            "incremental": True,
            "coordinates": [[1, 1, 0, 200], [2, 2, 0, 300]],
        },
        append_points=True,
    )
    await mirror.apply(SRC, Snapshot("s", [delta]))
    await mirror.apply(SRC, Snapshot("s", [delta]))  # re-read of an overlap window
    geometry = (await mirror_rows(db))[0]["geometry"]
    assert geometry == {
        "type": "LineString",
        "coordinates": [[0, 0, 0, 100], [1, 1, 0, 200], [2, 2, 0, 300]],
    }


async def test_same_id_in_two_classes_is_two_rows(db: Database) -> None:
    mirror = Mirror(db)
    track = Record(kind="AppTrack", external_id="x", collection="map1", name="t")
    shape = Record(kind="Shape", external_id="x", collection="map1", name="t")
    await mirror.apply(SRC, Snapshot("s", [track]))
    listing = Listing(frozenset({"map1"}), frozenset({("map1", "Shape", "x")}))
    await mirror.apply(SRC, Snapshot("s", [shape], listings=(listing,)))
    rows = {r["kind"]: r for r in await mirror_rows(db)}
    assert rows["AppTrack"]["deleted_at"] is not None
    assert rows["Shape"]["deleted_at"] is None


async def test_duplicate_ids_in_one_snapshot_are_folded(db: Database) -> None:
    result = await Mirror(db).apply(
        SRC, Snapshot("s", [marker("a", title="first"), marker("a", title="second")])
    )
    rows = await mirror_rows(db)
    assert result.inserted == 1
    assert [r["name"] for r in rows] == ["second"]


async def test_unrepresentable_record_is_skipped_not_fatal(db: Database) -> None:
    bad = Record(
        kind="Marker",
        external_id="nan",
        collection="map1",
        geometry={"type": "Point", "coordinates": [float("nan"), 0.0]},
    )
    with capture_logs() as logs:
        result = await Mirror(db).apply(SRC, Snapshot("s", [bad, marker("ok")], cursor="5"))
    assert (result.inserted, result.skipped) == (1, 1)
    assert any(e["event"] == "record.skipped" and e["id"] == "nan" for e in logs)
    assert await stored_cursors(db, SRC) == {"s": "5"}


@pytest.mark.parametrize(
    ("live", "deleting", "guard", "held"),
    [
        (100, 90, DeleteGuard(), True),
        (100, 50, DeleteGuard(), False),  # not more than half
        (12, 11, DeleteGuard(), True),
        (10, 9, DeleteGuard(), False),  # below the minimum count
        (100, 90, DeleteGuard(allow=True), False),
        (100, 30, DeleteGuard(max_fraction=0.2), True),
    ],
)
async def test_mass_delete_guard(
    db: Database, live: int, deleting: int, guard: DeleteGuard, held: bool
) -> None:
    mirror = Mirror(db)
    ids = [f"id{i}" for i in range(live)]
    await mirror.apply(SRC, Snapshot("s", [marker(i) for i in ids], cursor="1"))
    before = await mirror_rows(db)

    result = await mirror.apply(
        SRC,
        Snapshot("s", [marker("new")], cursor="2", listings=complete(*ids[deleting:])),
        guard=guard,
    )

    if held:
        assert result.held is not None
        assert (result.held.would_delete, result.held.live) == (deleting, live)
        assert await mirror_rows(db) == before  # not even the new record
        assert await stored_cursors(db, SRC) == {"s": "1"}
    else:
        assert result.held is None and result.deleted == deleting
        assert await stored_cursors(db, SRC) == {"s": "2"}


async def test_cursor_bookkeeping(db: Database) -> None:
    mirror = Mirror(db)
    await mirror.apply(SRC, Snapshot("acct", cursor="1", new_scopes={"map:a": "0", "map:b": "0"}))
    await mirror.apply(SRC, Snapshot("map:a", cursor="50"))
    # Discovering a scope again must not reset the cursor it already has.
    await mirror.apply(
        SRC,
        Snapshot("acct", cursor="2", new_scopes={"map:a": "0"}, drop_cursors=frozenset({"map:b"})),
    )
    assert await stored_cursors(db, SRC) == {"acct": "2", "map:a": "50"}


async def test_failed_commit_leaves_old_cursor_and_rows(db: Database) -> None:
    mirror = Mirror(db)
    await mirror.apply(SRC, Snapshot("s", [marker("a"), marker("b")], cursor="1"))
    before = await mirror_rows(db)

    def refuse_commit(_conn: Any) -> None:
        raise RuntimeError("power cut between writing rows and committing")

    event.listen(db.engine.sync_engine, "commit", refuse_commit)
    try:
        with pytest.raises(RuntimeError, match="power cut"):
            await mirror.apply(
                SRC,
                Snapshot(
                    "s",
                    [marker("a", title="x"), marker("c")],
                    cursor="2",
                    listings=complete("a", "c"),
                ),
            )
    finally:
        event.remove(db.engine.sync_engine, "commit", refuse_commit)

    assert await mirror_rows(db) == before
    assert await stored_cursors(db, SRC) == {"s": "1"}


async def test_remote_updated_at_round_trips_as_utc(db: Database) -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    record = Record(kind="Marker", external_id="a", collection="map1", remote_updated_at=when)
    await Mirror(db).apply(SRC, Snapshot("s", [record]))
    row = (await mirror_rows(db))[0]
    assert row["remote_updated_at"] == when
    assert row["first_seen_at"].tzinfo is not None


@pytest.mark.parametrize(
    "coordinates",
    [[1, 2], [[1, 2, 0, None]], "not a list", [[True, 1]], [[1]]],
    ids=["flat", "null-time", "string", "bool", "short"],
)
async def test_malformed_track_update_is_skipped_alone(db: Database, coordinates: Any) -> None:
    mirror = Mirror(db)
    track = Record(
        kind="AppTrack",
        external_id="t",
        collection="map1",
        name="T",
        geometry={"type": "LineString", "coordinates": [[0, 0, 0, 100]]},
    )
    await mirror.apply(SRC, Snapshot("s", [track]))
    bad = Record(
        kind="AppTrack",
        external_id="t",
        collection="map1",
        name=KEEP,
        properties=KEEP,
        geometry={"type": "LineString", "incremental": True, "coordinates": coordinates},
        append_points=True,
    )
    with capture_logs() as logs:
        result = await mirror.apply(SRC, Snapshot("s", [bad, marker("fine")], cursor="9"))
    assert (result.skipped, result.inserted) == (1, 1)
    assert any(e["event"] == "record.skipped" and e["id"] == "t" for e in logs)
    assert by_id(await mirror_rows(db))["t"]["geometry"]["coordinates"] == [[0, 0, 0, 100]]


def cascade(collection: str) -> Listing:
    return Listing(frozenset({collection}), frozenset(), cascade=True)


async def test_cascade_weighs_the_parent_share_and_the_whole_source(db: Database) -> None:
    """Losing one big container of many is applied; losing (nearly) everything is held."""
    mirror = Mirror(db)
    parents = [
        Record(kind="Map", external_id=m, collection="acct", name=m) for m in ("m1", "m2", "m3")
    ]
    children = [
        Record(kind="Marker", external_id=f"{m}-{i}", collection=m, name="x")
        for m in ("m1", "m2", "m3")
        for i in range(20)
    ]
    await mirror.apply(SRC, Snapshot("acct", parents + children))

    def account_without(*gone: str) -> Snapshot:
        keep = frozenset(("acct", "Map", m) for m in ("m1", "m2", "m3") if m not in gone)
        listings = (Listing(frozenset({"acct"}), keep), *(cascade(m) for m in gone))
        return Snapshot("acct", listings=listings)

    one = await mirror.apply(SRC, account_without("m1"))
    assert (one.held, one.deleted) == (None, 21)  # a third of the maps, a third of the rows

    everything = await mirror.apply(SRC, account_without("m2", "m3"))
    assert everything.held is not None and everything.held.would_delete == 42
    assert everything.deleted == 0


def test_utc_datetime_binding_remembers_only_the_very_same_value() -> None:
    """The bind converter caches its last answer by identity; other values convert anew."""
    process = UtcDateTime().bind_processor(sqlite_dialect.dialect())
    assert process is not None
    first = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    later = datetime(2024, 5, 1, 12, 0, 1, tzinfo=UTC)
    berlin = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    naive = datetime(2024, 5, 1, 12, 0)
    out = [process(v) for v in (first, first, later, None, first, berlin)]
    assert out == [naive, naive, naive + timedelta(seconds=1), None, naive, naive]
    assert out[0] is out[1]
    assert all(v is None or v.tzinfo is None for v in out)


# --- streamed records: applied in chunks, still one transaction ------------------------

MANY = apply_module._CHUNK * 2 + 1  # three chunks


def stream(count: int, *, title: str = "m", fail_after: int | None = None) -> Iterator[Record]:
    """Records as a one-shot generator, like a streamed upstream answer."""
    for i in range(count):
        if fail_after is not None and i == fail_after:
            raise ProtocolError("answer broke while being read")
        yield marker(f"id{i:06d}", title=title)


async def test_a_stream_larger_than_a_chunk_is_applied_whole(db: Database) -> None:
    mirror = Mirror(db)
    ids = [f"id{i:06d}" for i in range(MANY)]
    repeated = [*stream(MANY), marker(ids[0], title="last word")]  # a key in two chunks

    result = await mirror.apply(
        SRC, Snapshot("s", iter(repeated), cursor="5", listings=complete(*ids))
    )

    rows = by_id(await mirror_rows(db))
    assert len(rows) == MANY
    assert rows[ids[0]]["name"] == "last word"
    assert result.inserted == MANY
    assert await stored_cursors(db, SRC) == {"s": "5"}


async def test_a_stream_that_breaks_midway_writes_nothing(db: Database) -> None:
    mirror = Mirror(db)
    await mirror.apply(SRC, Snapshot("s", [marker("old")], cursor="1"))
    before = await mirror_rows(db), await change_log(db)
    broken = stream(MANY, title="new", fail_after=apply_module._CHUNK + 10)

    with pytest.raises(ProtocolError):
        await mirror.apply(SRC, Snapshot("s", broken, cursor="2", listings=complete()))

    assert (await mirror_rows(db), await change_log(db)) == before
    assert await stored_cursors(db, SRC) == {"s": "1"}


async def test_guard_weighs_only_rows_live_before_the_snapshot(db: Database) -> None:
    """Rows a streamed snapshot inserted or restored before the guard ran are not in
    its denominator: 9 of 10 old rows going is a mass delete, whatever came with it."""
    mirror = Mirror(db)
    old = [marker(f"old{i}") for i in range(10)]
    await mirror.apply(SRC, Snapshot("s", old, listings=complete(*(r.external_id for r in old))))
    new = [marker(f"new{i}") for i in range(30)]
    keep = ["old0", *(r.external_id for r in new)]

    result = await mirror.apply(
        SRC, Snapshot("s", iter(new), listings=complete(*keep)), guard=DeleteGuard(min_rows=5)
    )

    assert result.held is not None
    assert (result.held.would_delete, result.held.live) == (9, 10)
    assert result.inserted == 0  # rolled back with the rest
    assert {r["external_id"] for r in await mirror_rows(db)} == {f"old{i}" for i in range(10)}


async def test_an_object_too_deep_to_encode_is_skipped_alone(db: Database) -> None:
    deep: Any = []
    for _ in range(5000):
        deep = [deep]
    with capture_logs() as logs:
        result = await Mirror(db).apply(
            SRC, Snapshot("s", [marker("deep", nested=deep), marker("fine")], cursor="1")
        )
    assert (result.inserted, result.skipped) == (1, 1)
    assert [r["external_id"] for r in await mirror_rows(db)] == ["fine"]
    [skipped] = [e for e in logs if e["event"] == "record.skipped"]
    assert skipped["id"] == "deep" and "recursion" in skipped["reason"]


async def test_a_key_repeated_in_a_later_chunk_is_folded_into_one_write(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As within one chunk: one version and one change row per key and snapshot, counted
    once, whichever chunk a repeat lands in (issue 6 review)."""
    monkeypatch.setattr(apply_module, "_CHUNK", 2)
    mirror = Mirror(db)
    await mirror.apply(SRC, Snapshot("s", [marker("same"), marker("edited", title="v1")]))
    before = len(await change_log(db))

    records = [
        marker("new", title="first"),
        marker("same"),
        marker("edited", title="v1"),  # unchanged here ...
        marker("new", title="second"),  # ... a new key repeated in the next chunk
        marker("edited", title="v2"),  # ... and changed by its repeat
        marker("same"),
    ]
    result = await mirror.apply(SRC, Snapshot("s", iter(records)))

    rows = by_id(await mirror_rows(db))
    assert (rows["new"]["name"], rows["new"]["version"]) == ("second", 1)
    assert (rows["edited"]["name"], rows["edited"]["version"]) == ("v2", 2)
    assert rows["same"]["version"] == 1
    assert [op for _, op, _ in (await change_log(db))[before:]] == ["insert", "update"]
    assert (result.inserted, result.updated, result.unchanged) == (1, 1, 1)
