"""Property-based: random snapshot sequences applied to the mirror match a simple model.

Why: apply() merges, skips, tombstones and restores in one transaction; a plain dict
model of those rules, fed the same random snapshots (repeats, partial deltas, complete
and incomplete listings, explicit deletions), must end in the same state, with
versions that only grow and a change feed that replays to the final rows.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from syncd.mirror import Database, DeleteGuard, Mirror
from syncd.mirror.models import changes, features
from syncd.records import KEEP, Key, Listing, Record, Snapshot

COLLECTIONS = ("c1", "c2")
KINDS = ("Marker", "Shape")
IDS = ("1", "2")  # a small universe, so repeats, deletes and restores collide often
KEYS = [(c, k, i) for c in COLLECTIONS for k in KINDS for i in IDS]

names = st.sampled_from(["alpha", None])
geometries = st.sampled_from([None, {"type": "Point", "coordinates": [1.0, 2.0]}])
props = st.sampled_from([{}, {"color": "red"}])


@st.composite
def records(draw: st.DrawFn) -> Record:
    collection, kind, external_id = draw(st.sampled_from(KEYS))
    geometry_only = draw(st.booleans())
    return Record(
        kind=kind,
        external_id=external_id,
        collection=collection,
        name=KEEP if geometry_only else draw(names),
        geometry=draw(geometries),
        properties=KEEP if geometry_only else draw(props),
    )


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    listings: tuple[Listing, ...] = ()
    if draw(st.booleans()):
        collection = draw(st.sampled_from(COLLECTIONS))
        live = draw(st.sets(st.sampled_from([k for k in KEYS if k[0] == collection])))
        kinds = draw(st.sampled_from([None, frozenset({"Marker"})]))
        listings = (Listing(frozenset({collection}), frozenset(live), kinds=kinds),)
    return Snapshot(
        scope="s",
        records=draw(st.lists(records(), max_size=6)),
        listings=listings,
        deleted=frozenset(draw(st.sets(st.sampled_from(KEYS), max_size=2))),
        cursor=str(draw(st.integers(0, 10**6))),
    )


@dataclass
class ModelRow:
    name: str | None
    geometry: Any
    properties: dict[str, Any]
    deleted: bool
    version: int


def model_apply(model: dict[Key, ModelRow], snapshot: Snapshot) -> None:
    """The rules of ARCHITECTURE.md §1, written as plainly as possible."""
    live_before = {k for k, row in model.items() if not row.deleted}
    present = {r.key for r in snapshot.records}
    folded: dict[Key, tuple[Any, Any, Any]] = {}
    for record in snapshot.records:  # repeats of a key fold into one write
        row = model.get(record.key)
        base = folded.get(record.key) or ((row.name, row.geometry, row.properties) if row else None)
        name = (base[0] if base else None) if record.name is KEEP else record.name
        properties = (base[2] if base else {}) if record.properties is KEEP else record.properties
        folded[record.key] = (name, record.geometry, properties)
    for key, content in folded.items():
        row = model.get(key)
        if row is None:
            model[key] = ModelRow(*content, deleted=False, version=1)
        elif row.deleted or (row.name, row.geometry, row.properties) != content:
            model[key] = ModelRow(*content, deleted=False, version=row.version + 1)
    doomed = {k for k in snapshot.deleted if k in live_before and k not in present}
    for listing in snapshot.listings:
        doomed |= {
            k
            for k in live_before
            if listing.covers(k) and k not in listing.keys and k not in present
        }
    for key in doomed:
        model[key].deleted = True
        model[key].version += 1


async def mirror_state(db: Database, source: str) -> dict[Key, ModelRow]:
    f = features.c
    async with db.read() as conn:
        rows = await conn.execute(select(features).where(f.source == source))
        return {
            (r.collection, r.kind, r.external_id): ModelRow(
                r.name,
                json.loads(r.geometry) if r.geometry else None,
                json.loads(r.properties),
                r.deleted_at is not None,
                r.version,
            )
            for r in rows
        }


async def replayed(db: Database, source: str) -> dict[int, tuple[int, bool]]:
    """feature_id -> (version, deleted) from the change feed alone, checking its order."""
    state: dict[int, tuple[int, bool]] = {}
    async with db.read() as conn:
        rows = await conn.execute(
            select(changes.c.feature_id, changes.c.op, changes.c.version)
            .where(changes.c.source == source)
            .order_by(changes.c.seq)
        )
        for feature_id, op, version in rows:
            previous = state.get(feature_id)
            assert version == (1 if previous is None else previous[0] + 1)
            assert (op == "insert") == (previous is None)
            if op == "restore":
                assert previous is not None and previous[1]
            state[feature_id] = (version, op == "delete")
    return state


_sources = itertools.count()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(snapshots(), min_size=1, max_size=8))
def test_mirror_matches_model(sequence: list[Snapshot]) -> None:
    asyncio.run(_check(sequence))


async def _check(sequence: list[Snapshot]) -> None:
    source = f"s{next(_sources)}"
    db = Database(_DB_URL)
    try:
        mirror = Mirror(db)
        model: dict[Key, ModelRow] = {}
        for snapshot in sequence:
            await mirror.apply(source, snapshot, guard=DeleteGuard(allow=True))
            model_apply(model, snapshot)
        assert await mirror_state(db, source) == model
        f = features.c
        async with db.read() as conn:
            rows = await conn.execute(
                select(f.id, f.version, f.deleted_at).where(f.source == source)
            )
            expected = {fid: (version, deleted is not None) for fid, version, deleted in rows}
        assert await replayed(db, source) == expected
    finally:
        await db.dispose()


def _migrated_database() -> str:
    url = f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='syncd-prop-')}/mirror.db"

    async def upgrade() -> None:
        db = Database(url)
        await db.upgrade()
        await db.dispose()

    asyncio.run(upgrade())
    return url


_DB_URL = _migrated_database()
assert Path(_DB_URL.split("///", 1)[1]).exists()
