"""`syncd export` of a mirrored sandbox world: GeoJSON, GeoJSON Sequence, CSV with WKT.

Why: users open these files in QGIS; each must parse as its standard says, carry every
live object once (tombstoned ones only on request), and honour the filters.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from syncd.cli import build_parser, cmd_export
from syncd.engine import Engine
from syncd.export import CSV_COLUMNS, RS, ExportFilter, export, to_wkt
from syncd.mirror import Database
from syncd.sandbox.caltopo import populate
from tests.conftest import Sandbox, mirror_rows
from tests.daemon_process import write_config
from tests.integration.test_daemon import caltopo_source

GEOMETRY_DEPTH = {"Point": 0, "LineString": 1, "MultiPoint": 1, "Polygon": 2}


def assert_valid_feature(feature: Any) -> None:
    """RFC 7946 §3.2 structure; positions are arrays of at least two numbers."""
    assert feature["type"] == "Feature"
    assert isinstance(feature["properties"], dict)
    geometry = feature["geometry"]
    if geometry is None:
        return
    assert geometry["type"] in GEOMETRY_DEPTH, geometry["type"]

    def positions(value: Any, depth: int) -> None:
        if depth == 0:
            assert len(value) >= 2 and all(isinstance(n, int | float) for n in value)
        else:
            assert isinstance(value, list) and value
            for item in value:
                positions(item, depth - 1)

    positions(geometry["coordinates"], GEOMETRY_DEPTH[geometry["type"]])
    if geometry["type"] == "Polygon":
        for ring in geometry["coordinates"]:
            assert ring[0] == ring[-1] and len(ring) >= 4


@pytest.fixture
async def mirrored(sandbox: Sandbox, engine: Engine, db: Database) -> dict[str, Any]:
    """A synced world in which one Marker was then deleted and synced away."""
    world = sandbox.caltopo
    populate(world, maps=2, objects_per_map=8, seed=6)
    settings = sandbox.caltopo_settings("sar")
    assert (await engine.sync(settings)).status == "ok"
    map_id = world.map_ids()[0]
    marker = next(k for k in world.live_objects(map_id) if k[0] == "Marker")
    world.delete_object(map_id, *marker)
    assert (await engine.sync(settings)).deleted == 1
    rows = await mirror_rows(db, "sar")
    return {"rows": rows, "deleted": marker[1], "map": map_id}


async def run_export(db: Database, fmt: Any, **filters: Any) -> str:
    out = io.StringIO()
    count = await export(db, out, fmt, ExportFilter(**filters))
    text = out.getvalue()
    assert count == (text.count(RS) if fmt == "geojsonseq" else count)
    return text


async def test_geojson_is_one_valid_feature_collection_of_live_rows(
    db: Database, mirrored: dict[str, Any]
) -> None:
    document = json.loads(await run_export(db, "geojson"))
    assert document["type"] == "FeatureCollection"
    live = [r for r in mirrored["rows"] if r["deleted_at"] is None]
    assert [f["id"] for f in document["features"]] == [r["id"] for r in live]
    for feature in document["features"]:
        assert_valid_feature(feature)
    by_id = {r["id"]: r for r in live}
    for feature in document["features"]:
        row = by_id[feature["id"]]
        assert feature["geometry"] == row["geometry"]
        assert feature["properties"]["properties"] == row["properties"]
        assert feature["properties"]["name"] == row["name"]
        assert feature["properties"]["kind"] == row["kind"]
    assert mirrored["deleted"] not in {f["properties"]["external_id"] for f in document["features"]}


async def test_geojsonseq_is_rfc8142_and_includes_deleted_on_request(
    db: Database, mirrored: dict[str, Any]
) -> None:
    text = await run_export(db, "geojsonseq", include_deleted=True)
    texts = text.split(RS)
    assert texts[0] == ""  # every text starts with RS ...
    features = []
    for chunk in texts[1:]:
        assert chunk.endswith("\n") and chunk.count("\n") == 1  # ... and ends with LF
        features.append(json.loads(chunk))
    for feature in features:
        assert_valid_feature(feature)
    assert len(features) == len(mirrored["rows"])
    deleted = [f for f in features if f["properties"]["deleted_at"] is not None]
    assert [f["properties"]["external_id"] for f in deleted] == [mirrored["deleted"]]


async def test_csv_has_wkt_geometry_and_filters(db: Database, mirrored: dict[str, Any]) -> None:
    text = await run_export(db, "csv", kinds=["Marker"], collections=[mirrored["map"]])
    reader = csv.DictReader(io.StringIO(text))
    assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
    records = list(reader)
    expected = [
        r
        for r in mirrored["rows"]
        if r["kind"] == "Marker" and r["collection"] == mirrored["map"] and r["deleted_at"] is None
    ]
    assert [int(r["id"]) for r in records] == [r["id"] for r in expected]
    for record, row in zip(records, expected, strict=True):
        lon, lat = row["geometry"]["coordinates"][:2]
        assert record["wkt"] == f"POINT ({lon!r} {lat!r})"
        assert json.loads(record["properties"]) == row["properties"]
    none = await run_export(db, "csv", sources=["someone-else"])
    assert none.splitlines() == [",".join(CSV_COLUMNS)]


@pytest.mark.parametrize(
    ("geometry", "wkt"),
    [
        ({"type": "Point", "coordinates": [1.5, 2]}, "POINT (1.5 2)"),
        ({"type": "Point", "coordinates": [1, 2, 3]}, "POINT Z (1 2 3)"),
        ({"type": "LineString", "coordinates": [[0, 0], [1, 1.25]]}, "LINESTRING (0 0, 1 1.25)"),
        (
            {"type": "LineString", "coordinates": [[0, 0, 10, 1700], [1, 1, 11, 1705]]},
            "LINESTRING ZM (0 0 10 1700, 1 1 11 1705)",
        ),
        (
            {"type": "LineString", "coordinates": [[0, 0, 10], [1, 1]]},
            "LINESTRING (0 0, 1 1)",  # mixed dimensions: cut to the shortest
        ),
        (
            {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]},
            "POLYGON ((0 0, 1 0, 1 1, 0 0))",
        ),
        (
            {"type": "MultiPolygon", "coordinates": [[[[0, 0], [1, 0], [1, 1], [0, 0]]]]},
            "MULTIPOLYGON (((0 0, 1 0, 1 1, 0 0)))",
        ),
        (
            {
                "type": "GeometryCollection",
                "geometries": [{"type": "Point", "coordinates": [1, 2]}],
            },
            "GEOMETRYCOLLECTION (POINT (1 2))",
        ),
        ({"type": "LineString", "coordinates": []}, "LINESTRING EMPTY"),
    ],
)
def test_wkt(geometry: dict[str, Any], wkt: str) -> None:
    assert to_wkt(geometry) == wkt


async def test_export_command_writes_a_file_whole(
    sandbox: Sandbox, tmp_path: Path, db: Database, mirrored: dict[str, Any]
) -> None:
    if db.dialect != "sqlite":
        pytest.skip("the command is exercised once; the query runs on both backends above")
    database = db.engine.url.database
    config = write_config(
        tmp_path / "c.toml", Path(str(database)), [caltopo_source(sandbox, "sar")]
    )
    target = tmp_path / "out.geojson"
    args = build_parser().parse_args(
        [
            "export",
            "--config",
            str(config),
            "--format",
            "geojson",
            "-o",
            str(target),
            "--kind",
            "Shape",
        ]
    )
    assert await cmd_export(args) == 0
    features = json.loads(target.read_text())["features"]
    assert features and {f["properties"]["kind"] for f in features} == {"Shape"}
    assert [name for name in os.listdir(tmp_path) if name.endswith(".partial")] == []
