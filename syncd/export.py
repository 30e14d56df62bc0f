"""`syncd export`: the mirror as GeoJSON, GeoJSON Sequence (RFC 8142) or CSV with WKT.

Rows are streamed from the database (`AsyncConnection.stream`, a server-side cursor
on PostgreSQL) and written one at a time, so memory stays constant however large
the mirror. Every format carries the same fields: the mirror's own columns, and the
upstream `properties` as one nested JSON object (lossless; QGIS shows it as a map).
"""

from __future__ import annotations

import csv
import json
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TextIO

from sqlalchemy import Select, select

from syncd.mirror import Database
from syncd.mirror.models import features

Format = Literal["geojson", "geojsonseq", "csv"]
FORMATS: tuple[Format, ...] = ("geojson", "geojsonseq", "csv")

RS = "\x1e"  # RFC 8142: every text of a GeoJSON Sequence starts with RECORD SEPARATOR

FIELDS = (
    "id",
    "source",
    "collection",
    "kind",
    "external_id",
    "name",
    "version",
    "remote_updated_at",
    "first_seen_at",
    "last_seen_at",
    "updated_at",
    "deleted_at",
)
CSV_COLUMNS = (*FIELDS, "wkt", "properties")


@dataclass(frozen=True)
class ExportFilter:
    """Which rows to export; empty tuples mean "all"."""

    sources: Sequence[str] = ()
    collections: Sequence[str] = ()
    kinds: Sequence[str] = ()
    include_deleted: bool = False

    def query(self) -> Select[Any]:
        f = features.c
        query = select(features).order_by(f.id)
        if self.sources:
            query = query.where(f.source.in_(self.sources))
        if self.collections:
            query = query.where(f.collection.in_(self.collections))
        if self.kinds:
            query = query.where(f.kind.in_(self.kinds))
        if not self.include_deleted:
            query = query.where(f.deleted_at.is_(None))
        return query


async def rows(db: Database, which: ExportFilter) -> AsyncGenerator[dict[str, Any], None]:
    """Matching feature rows, streamed in id order."""
    async with db.read() as conn:
        result = await conn.stream(which.query().execution_options(yield_per=500))
        async for row in result.mappings():
            yield dict(row)


async def export(db: Database, out: TextIO, fmt: Format, which: ExportFilter) -> int:
    """Write the matching rows to `out` in `fmt`; return how many were written."""
    count = 0
    stream = rows(db, which)
    try:
        if fmt == "csv":
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(CSV_COLUMNS)
            async for row in stream:
                writer.writerow(_csv_row(row))
                count += 1
        elif fmt == "geojsonseq":
            async for row in stream:
                out.write(RS + json.dumps(_feature(row), separators=(",", ":")) + "\n")
                count += 1
        else:
            out.write('{"type":"FeatureCollection","features":[\n')
            async for row in stream:
                out.write(("," if count else "") + json.dumps(_feature(row)) + "\n")
                count += 1
            out.write("]}\n")
    finally:
        await stream.aclose()
    return count


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _feature(row: dict[str, Any]) -> dict[str, Any]:
    properties = {key: _plain(row[key]) for key in FIELDS}
    properties["properties"] = json.loads(row["properties"]) if row["properties"] else {}
    return {
        "type": "Feature",
        "id": row["id"],
        "geometry": json.loads(row["geometry"]) if row["geometry"] else None,
        "properties": properties,
    }


def _csv_row(row: dict[str, Any]) -> list[Any]:
    values = [_plain(row[key]) for key in FIELDS]
    geometry = json.loads(row["geometry"]) if row["geometry"] else None
    return [*values, to_wkt(geometry) if geometry else "", row["properties"] or "{}"]


# ---- WKT -----------------------------------------------------------------------------
# A GeoJSON geometry as OGC WKT, for QGIS's delimited-text reader. No library in the
# stack does this (shapely would be a compiled dependency for ~30 lines).

_WKT_NAMES = {
    "Point": "POINT",
    "MultiPoint": "MULTIPOINT",
    "LineString": "LINESTRING",
    "MultiLineString": "MULTILINESTRING",
    "Polygon": "POLYGON",
    "MultiPolygon": "MULTIPOLYGON",
    "GeometryCollection": "GEOMETRYCOLLECTION",
}
_DEPTH = {"Point": 0, "MultiPoint": 1, "LineString": 1, "MultiLineString": 2, "Polygon": 2}
_DEPTH["MultiPolygon"] = 3


def to_wkt(geometry: dict[str, Any]) -> str:
    """WKT of a GeoJSON geometry; 3 and 4 coordinates become Z and ZM (CalTopo tracks
    carry altitude and time); positions are cut to the shortest one of the geometry."""
    kind = geometry.get("type")
    if kind not in _WKT_NAMES:
        raise ValueError(f"not a GeoJSON geometry type: {kind!r}")
    name = _WKT_NAMES[kind]
    if kind == "GeometryCollection":
        parts = geometry.get("geometries") or []
        if not parts:
            return f"{name} EMPTY"
        return f"{name} (" + ", ".join(to_wkt(g) for g in parts) + ")"
    coordinates = geometry.get("coordinates")
    if not coordinates:
        return f"{name} EMPTY"
    depth = _DEPTH[kind]
    dims = max(2, min(4, _min_dims(coordinates, depth)))
    suffix = {2: "", 3: " Z", 4: " ZM"}[dims]
    return f"{name}{suffix} {_wkt_coords(coordinates, depth, dims)}"


def _min_dims(coordinates: Any, depth: int) -> int:
    if depth == 0:
        return len(coordinates)
    return min((_min_dims(c, depth - 1) for c in coordinates), default=2)


def _wkt_coords(coordinates: Any, depth: int, dims: int) -> str:
    if depth == 0:
        return "(" + _position(coordinates, dims) + ")"
    if depth == 1:
        return "(" + ", ".join(_position(p, dims) for p in coordinates) + ")"
    return "(" + ", ".join(_wkt_coords(c, depth - 1, dims) for c in coordinates) + ")"


def _position(position: Sequence[float], dims: int) -> str:
    return " ".join(_number(v) for v in position[:dims])


def _number(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))
