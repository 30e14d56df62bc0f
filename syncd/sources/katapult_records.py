"""Katapult objects as Records (ARCHITECTURE.md §5, Katapult).

Node and section: Point(longitude, latitude). Connection: LineString from node 1
through its `breakpoints` ([lat, lng] pairs) to node 2, NULL with a
`record.invalid_geometry` event when a node is unknown. Entity attribute lists
`{name: {instance_id: value}}` are flattened: one instance -> the value, several ->
the values ordered by instance id. Unknown fields are mirrored as they come.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import structlog

from syncd.records import JSON, Record

log = structlog.get_logger(__name__)


def flatten_attributes(attributes: Any) -> Any:
    """An entity attribute list as `{name: value}` / `{name: [values by instance id]}`."""
    if not isinstance(attributes, dict):
        return attributes
    flat: JSON = {}
    for name, instances in attributes.items():
        if isinstance(instances, dict):
            values = [instances[k] for k in sorted(instances)]
            if not values:
                continue  # an attribute with no instances is not set
            flat[name] = values[0] if len(values) == 1 else values
        else:
            flat[name] = instances
    return flat


def iso_time(value: Any) -> datetime | None:
    """A Katapult ISO 8601 timestamp (or epoch ms) as an aware datetime; None if unusable."""
    if isinstance(value, str) and value:
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return when if when.tzinfo else when.replace(tzinfo=UTC)
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        try:
            return datetime.fromtimestamp(value / 1000, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    return None


def point(raw: JSON) -> JSON | None:
    """Point(longitude, latitude), or None when either is missing or not a finite number."""
    lat, lon = raw.get("latitude"), raw.get("longitude")
    if not (_number(lat) and _number(lon)):
        return None
    return {"type": "Point", "coordinates": [lon, lat]}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _id(raw: Any, what: str) -> str:
    if not isinstance(raw, dict):
        raise ValueError(f"{what} is not an object")
    value = raw.get("id")
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} without an id")
    return value


def job_record(job_id: str, job: JSON, entry: JSON) -> Record:
    """The job itself: name, status, metadata and the rest of the requested paths."""
    properties = {k: v for k, v in job.items() if k not in ("id", "name")}
    if "status" not in properties and "status" in entry:
        properties["status"] = entry["status"]
    name = job.get("name")
    return Record(
        kind="job",
        external_id=job_id,
        collection=job_id,
        name=name if isinstance(name, str) else None,
        geometry=None,
        properties=properties,
        remote_updated_at=iso_time(entry.get("last_updated")),
    )


def node_record(raw: Any, job_id: str) -> Record:
    """A node: its point, flattened attributes, everything else verbatim."""
    node_id = _id(raw, "node")
    geometry = point(raw)
    if geometry is None:
        log.warning("record.invalid_geometry", kind="node", id=node_id, collection=job_id)
    return Record(
        kind="node",
        external_id=node_id,
        collection=job_id,
        geometry=geometry,
        properties=_properties(raw, ("latitude", "longitude", "last_updated")),
        remote_updated_at=iso_time(raw.get("last_updated")),
    )


def connection_records(
    raw: Any, job_id: str, positions: dict[str, list[float]], *, source: str
) -> list[Record]:
    """A connection (LineString between its nodes) and one record per section."""
    conn_id = _id(raw, "connection")
    ends = [positions.get(str(raw.get(k))) for k in ("node_id_1", "node_id_2")]
    geometry: JSON | None = None
    if ends[0] is not None and ends[1] is not None:
        middle = [
            [bp[1], bp[0]]
            for bp in raw.get("breakpoints") or []
            if isinstance(bp, list) and len(bp) >= 2 and _number(bp[0]) and _number(bp[1])
        ]
        geometry = {"type": "LineString", "coordinates": [ends[0], *middle, ends[1]]}
    else:
        log.warning(
            "record.invalid_geometry",
            source=source,
            kind="connection",
            id=conn_id,
            collection=job_id,
            reason="unknown node",
            node_id_1=raw.get("node_id_1"),
            node_id_2=raw.get("node_id_2"),
        )
    sections = raw.get("sections") if isinstance(raw.get("sections"), dict) else {}
    properties = _properties(raw, ("sections",))
    properties["section_ids"] = sorted(sections)
    records = [
        Record(
            kind="connection",
            external_id=conn_id,
            collection=job_id,
            geometry=geometry,
            properties=properties,
        )
    ]
    for section_id, section in sorted(sections.items()):
        if not isinstance(section, dict):
            continue
        section_props = _properties(section, ("latitude", "longitude", "id"))
        section_props["connection_id"] = conn_id
        records.append(
            Record(
                kind="section",
                external_id=str(section_id),
                collection=job_id,
                geometry=point(section),
                properties=section_props,
            )
        )
    return records


def plain_record(raw: Any, job_id: str, kind: str) -> Record:
    """A photo or trace record: no geometry in this issue, every field kept."""
    external_id = _id(raw, kind)
    return Record(
        kind=kind,
        external_id=external_id,
        collection=job_id,
        properties=_properties(raw, ()),
    )


def _properties(raw: JSON, drop: tuple[str, ...]) -> JSON:
    props = {k: v for k, v in raw.items() if k != "id" and k not in drop}
    if "attributes" in props:
        props["attributes"] = flatten_attributes(props["attributes"])
    return props
