"""Kartorium feature geometry as GeoJSON (ARCHITECTURE.md §5, kartorium-client-api.txt).

`marker` → Point from the row's `position` (three numbers: lon, lat, alt); `line` →
LineString and `polygon` → Polygon from the `coordinateString` property (a JSON string
of coordinate arrays). Anything malformed raises `InvalidGeometry` with a short reason;
the source keeps the feature with a NULL geometry and logs that reason once, so a bad
coordinate string never fails a sync.
"""

from __future__ import annotations

import json
import math
from typing import Any

from syncd.records import JSON

COORDINATE_KEY = "coordinateString"
GEOMETRY_TYPES = {"marker": "Point", "line": "LineString", "polygon": "Polygon"}


class InvalidGeometry(ValueError):
    """A feature's position or coordinate string cannot be turned into GeoJSON."""


def feature_geometry(feature_type: Any, position: Any, coordinate_string: Any) -> JSON | None:
    """The GeoJSON geometry of one feature, None for types that have none.

    `coordinate_string` is the raw `value` of the `coordinateString` property, or None
    when the feature has no such property.
    """
    if feature_type == "marker":
        return {"type": "Point", "coordinates": marker_position(position)}
    if feature_type == "line":
        return {"type": "LineString", "coordinates": line_coordinates(coordinate_string)}
    if feature_type == "polygon":
        return {"type": "Polygon", "coordinates": polygon_rings(coordinate_string)}
    return None


def marker_position(position: Any) -> list[float]:
    """`position` must be exactly [lon, lat, alt] (the page: three-number arrays)."""
    if position is None:
        raise InvalidGeometry("marker has no position")
    if not isinstance(position, list):
        raise InvalidGeometry("position is not an array")
    if len(position) != 3:
        raise InvalidGeometry(f"position has {len(position)} values, expected 3 (lon, lat, alt)")
    return _position(position, "position")


def line_coordinates(coordinate_string: Any) -> list[list[float]]:
    """A list of positions with at least two distinct points."""
    data = _parse(coordinate_string)
    if _depth(data) != 2:
        raise InvalidGeometry("line coordinateString must be a list of [lon, lat(, alt)] positions")
    points = [_position(p, f"point {i}") for i, p in enumerate(data)]
    if len(points) < 2 or all(p[:2] == points[0][:2] for p in points):
        raise InvalidGeometry("line needs at least 2 distinct points")
    return points


def polygon_rings(coordinate_string: Any) -> list[list[list[float]]]:
    """One ring or a list of rings; an open ring is closed by repeating its first point."""
    data = _parse(coordinate_string)
    depth = _depth(data)
    if depth == 2:
        data = [data]
    elif depth != 3:
        raise InvalidGeometry("polygon coordinateString must be a ring or a list of rings")
    rings: list[list[list[float]]] = []
    for r, ring in enumerate(data):
        points = [_position(p, f"ring {r} point {i}") for i, p in enumerate(ring)]
        if points and points[0] != points[-1]:
            points.append(points[0])
        distinct = {tuple(p[:2]) for p in points}
        if len(points) < 4 or len(distinct) < 3:
            raise InvalidGeometry(f"ring {r} needs at least 3 distinct points")
        rings.append(points)
    return rings


def _parse(coordinate_string: Any) -> Any:
    if coordinate_string is None:
        raise InvalidGeometry("no coordinateString property")
    if not isinstance(coordinate_string, str):
        raise InvalidGeometry("coordinateString is not a string")
    if not coordinate_string.strip():
        raise InvalidGeometry("coordinateString is empty")
    try:
        # NaN and Infinity are not JSON; refuse them here rather than store them.
        return json.loads(coordinate_string, parse_constant=_no_constant)
    except InvalidGeometry:
        raise
    except ValueError as err:
        raise InvalidGeometry(f"coordinateString is not JSON ({err.args[0][:60]})") from None
    except RecursionError:
        raise InvalidGeometry("coordinateString is nested too deeply") from None


def _no_constant(name: str) -> Any:
    raise InvalidGeometry(f"coordinateString contains {name}")


def _depth(value: Any) -> int:
    """Nesting depth of a non-empty list structure, by its first elements (0: a scalar)."""
    depth = 0
    while isinstance(value, list):
        if not value:
            raise InvalidGeometry("coordinateString holds an empty array")
        depth += 1
        value = value[0]
    return depth


def _position(value: Any, where: str) -> list[float]:
    if not isinstance(value, list) or len(value) not in (2, 3):
        raise InvalidGeometry(f"{where} is not [lon, lat(, alt)]")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise InvalidGeometry(f"{where} has a non-number {v!r:.20}")
        try:
            finite = math.isfinite(v)
        except OverflowError:  # an integer too large for a float
            finite = False
        if not finite:
            raise InvalidGeometry(f"{where} has a non-finite number")
    lon, lat = value[0], value[1]
    if not (-180 <= lon <= 180 and -90 <= lat <= 90):
        raise InvalidGeometry(f"{where} is outside WGS84 lon/lat range")
    return list(value)
