"""A mirrored object's content: canonical JSON, its hash, and the merge of partial deltas."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from syncd.records import JSON, KEEP, Record

_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no spaces, UTF-8 kept, NaN/Infinity refused.

    One encoder for every call: `json.dumps` with options builds a new one each time,
    a fifth of this function's cost over a 100k-object map (tests/bench, issue 7).
    """
    return _CANONICAL.encode(value)


@dataclass(frozen=True)
class Content:
    """The part of a row that a content change bumps the version of."""

    name: str | None
    geometry: JSON | None
    properties: JSON
    remote_updated_at: datetime | None
    geometry_text: str | None = field(init=False)
    properties_text: str = field(init=False)
    hash: str = field(init=False)

    def __post_init__(self) -> None:
        try:
            geometry_text = None if self.geometry is None else canonical_json(self.geometry)
            properties_text = canonical_json(self.properties)
        except ValueError as err:  # NaN or Infinity: not representable in JSON
            raise ValueError(f"content is not valid JSON: {err}") from None
        digest = hashlib.blake2b(digest_size=32)
        for part in (self.name, geometry_text, properties_text):
            digest.update(b"\x00" if part is None else b"\x01" + part.encode())
            digest.update(b"\x1f")
        object.__setattr__(self, "geometry_text", geometry_text)
        object.__setattr__(self, "properties_text", properties_text)
        object.__setattr__(self, "hash", digest.hexdigest())

    def columns(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "geometry": self.geometry_text,
            "properties": self.properties_text,
            "content_hash": self.hash,
            "remote_updated_at": self.remote_updated_at,
        }


def content_of(
    name: str | None, geometry: str | None, properties: str, remote_updated_at: datetime | None
) -> Content:
    """Content from a stored row's columns."""
    return Content(
        name=name,
        geometry=json.loads(geometry) if geometry else None,
        properties=json.loads(properties) if properties else {},
        remote_updated_at=remote_updated_at,
    )


def merge(base: Content | None, record: Record) -> Content:
    """The content after applying `record` on top of the stored `base` (None: not stored).

    Fields a partial delta marks KEEP keep their stored value; an `append_points`
    geometry extends the stored track (FACTS.md, CalTopo partial deltas).
    """
    name = (base.name if base else None) if record.name is KEEP else record.name
    properties = (
        (base.properties if base else {}) if record.properties is KEEP else record.properties
    )
    stored_geometry = base.geometry if base else None
    if record.geometry is KEEP:
        geometry = stored_geometry
    elif record.append_points and record.geometry is not None:
        geometry = append_track_points(stored_geometry, record.geometry)
    else:
        geometry = record.geometry
    if isinstance(name, str) and "\x00" in name:
        # PostgreSQL text cannot hold NUL (issue 6: one such name failed the whole
        # source); U+FFFD on every backend keeps SQLite and PostgreSQL mirrors equal.
        name = name.replace("\x00", "\ufffd")
    remote = record.remote_updated_at or (base.remote_updated_at if base else None)
    return Content(name=name, geometry=geometry, properties=properties, remote_updated_at=remote)


def append_track_points(stored: JSON | None, delta: JSON) -> JSON:
    """Append the delta's points that are newer than the stored track's last point.

    Points carry their time as a 4th coordinate; only later ones are appended, so
    re-reading an overlap window never duplicates a point. Without times, points that
    already end the stored track are recognised and not appended again.
    """
    new_points = _positions(delta.get("coordinates"))
    if new_points is None:
        raise ValueError("incremental geometry: coordinates are not a list of positions")
    result = {k: v for k, v in delta.items() if k != "incremental"}
    points = _positions(stored.get("coordinates")) if stored else None
    if not stored or points is None or stored.get("type") != delta.get("type", "LineString"):
        result["coordinates"] = new_points
        return result
    last_time = points[-1][3] if points and len(points[-1]) >= 4 else None
    if last_time is not None:
        fresh = [p for p in new_points if len(p) < 4 or p[3] > last_time]
    elif new_points and points[-len(new_points) :] == new_points:
        fresh = []
    else:
        fresh = new_points
    return {**stored, "coordinates": points + fresh}


def _positions(value: Any) -> list[list[Any]] | None:
    """The value as a list of numeric positions, or None if it is anything else."""
    if not isinstance(value, list):
        return None
    positions = []
    for point in value:
        if not isinstance(point, list) or len(point) < 2:
            return None
        if not all(isinstance(c, int | float) and not isinstance(c, bool) for c in point):
            return None
        positions.append(list(point))
    return positions
