"""Kartorium normalization: geometry from positions and coordinate strings, envelopes, scopes.

Why: a malformed coordinate string must never fail a sync nor be stored as a broken
geometry; the documented outcome is "feature kept, geometry NULL, one event".
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from syncd.errors import ProtocolError
from syncd.sources.kartorium import KartoriumSettings, ProjectState
from syncd.sources.kartorium_api import missing_scope, unwrap_list
from syncd.sources.kartorium_geometry import InvalidGeometry, feature_geometry

LINE = "[[-105.2705,40.015,0],[-105.271,40.016,0]]"


@pytest.mark.parametrize(
    ("feature_type", "position", "coordinates", "expected"),
    [
        ("marker", [1.5, 2.5, 3], None, {"type": "Point", "coordinates": [1.5, 2.5, 3]}),
        (
            "line",
            None,
            LINE,
            {"type": "LineString", "coordinates": [[-105.2705, 40.015, 0], [-105.271, 40.016, 0]]},
        ),
        (
            "polygon",
            None,
            "[[0,0],[1,0],[1,1]]",
            {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]},
        ),
        (
            "polygon",
            None,
            "[[[0,0],[4,0],[4,4],[0,0]],[[1,1],[2,1],[2,2]]]",
            {
                "type": "Polygon",
                "coordinates": [
                    [[0, 0], [4, 0], [4, 4], [0, 0]],
                    [[1, 1], [2, 1], [2, 2], [1, 1]],
                ],
            },
        ),
        ("model", [1, 2, 3], None, None),
    ],
    ids=["marker", "line", "open-ring-closed", "rings-with-hole", "other-type"],
)
def test_valid_geometry(
    feature_type: str, position: Any, coordinates: str | None, expected: Any
) -> None:
    assert feature_geometry(feature_type, position, coordinates) == expected


@pytest.mark.parametrize(
    ("feature_type", "position", "coordinates", "reason"),
    [
        ("line", None, "[[1,2],[3", "not JSON"),
        ("line", None, '{"type":"LineString"}', "list of"),
        ("line", None, "[[[1,2],[3,4]]]", "list of"),
        ("polygon", None, "[[[[0,0],[1,0],[1,1]]]]", "ring or a list of rings"),
        ("line", None, "[[NaN,2],[3,4]]", "NaN"),
        ("line", None, "[[1,2],[Infinity,4]]", "Infinity"),
        ("line", None, "[[1,2]]", "at least 2 distinct"),
        ("line", None, "[[1,2],[1,2]]", "at least 2 distinct"),
        ("polygon", None, "[[0,0],[1,1]]", "at least 3 distinct"),
        ("line", None, '[["1","2"],[3,4]]', "non-number"),
        ("line", None, "[[true,2],[3,4]]", "non-number"),
        ("line", None, "[[1,2,3,4],[3,4]]", "is not [lon, lat(, alt)]"),
        ("line", None, "[[200,2],[3,4]]", "outside WGS84"),
        ("line", None, "[]", "empty array"),
        ("line", None, "", "empty"),
        ("line", None, None, "no coordinateString"),
        ("polygon", None, 12, "not a string"),
        ("marker", [1.0, 2.0], None, "has 2 values"),
        ("marker", [1.0, 2.0, 3.0, 4.0], None, "has 4 values"),
        ("marker", ["1", 2.0, 3.0], None, "non-number"),
        ("marker", [float("nan"), 2.0, 3.0], None, "non-finite"),
        ("marker", None, None, "no position"),
        ("marker", "1,2,3", None, "not an array"),
        ("marker", [1.0, 95.0, 0.0], None, "outside WGS84"),
        ("marker", [10**400, 0, 0], None, "non-finite"),  # too large for a float
        ("line", None, "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_malformed_geometry_is_refused_with_a_reason(
    feature_type: str, position: Any, coordinates: Any, reason: str
) -> None:
    with pytest.raises(InvalidGeometry, match=re.escape(reason)):
        feature_geometry(feature_type, position, coordinates)


@pytest.mark.parametrize(
    ("payload", "message", "expected"),
    [
        ({"error": "missing_scope", "missing_scope": "features:read"}, "", "features:read"),
        ({"error": {"code": "missing_scope", "scopes": ["scenes:read"]}}, "", "scenes:read"),
        ({"error": "missing_scope", "required_scope": "projects:read"}, "", "projects:read"),
        ({"message": "Missing scope features:read"}, "", "features:read"),
        (None, "GET /x: HTTP 403: missing_scope features:write", "features:write"),
        ({"error": "missing_scope"}, "GET /x: HTTP 403: missing_scope", None),
    ],
)
def test_missing_scope_is_read_from_the_body(
    payload: object, message: str, expected: str | None
) -> None:
    assert missing_scope(payload, message) == expected


@pytest.mark.parametrize(
    "body",
    [
        {"data": [1], "next": "/client/projects?page=2"},
        {"data": [1], "hasMore": True},
        {"data": [1], "total": 40},
        {"items": [1]},
        "nope",
    ],
)
def test_listing_that_may_be_incomplete_is_a_protocol_error(body: Any) -> None:
    with pytest.raises(ProtocolError):
        unwrap_list(body, "/client/projects")


def test_listing_envelopes() -> None:
    assert unwrap_list([1, 2], "/p") == [1, 2]
    assert unwrap_list({"data": [1, 2], "total": 2}, "/p") == [1, 2]


@pytest.mark.parametrize("cursor", [None, "", "{", "[]", '{"v":0,"passes":1,"rows":{}}', '{"v":1}'])
def test_unreadable_project_cursor_means_fetch_everything(cursor: str | None) -> None:
    assert ProjectState.parse(cursor) == ProjectState()


def test_project_cursor_round_trip() -> None:
    state = ProjectState(3, {"101": "00ff00ff00ff00ff"})
    assert ProjectState.parse(state.dump()) == state


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"base_url": "ftp://x"}, "base_url"),
        ({"base_url": "https://k.app/api/v1?api_key=abc"}, "base_url"),
        ({"api_key": " "}, "api_key"),
        ({"projects": [0]}, "projects"),
        ({"properties_recheck_every": 0}, "properties_recheck_every"),
        ({"api_tokens": "x"}, "api_tokens"),
    ],
)
def test_settings_refuse_bad_values(overrides: dict[str, Any], field: str) -> None:
    values = {"name": "twin", "type": "kartorium", "api_key": "karta_live_x", **overrides}
    with pytest.raises(ValidationError) as info:
        KartoriumSettings.model_validate(values)
    assert field in str(info.value)
    assert "karta_live_x" not in str(info.value)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(
    feature_type=st.sampled_from(["marker", "line", "polygon"]),
    position=_json_values,
    coordinates=_json_values,
)
def test_any_input_gives_geometry_or_invalid_geometry(
    feature_type: str, position: Any, coordinates: Any
) -> None:
    """Whatever the upstream sends, the outcome is a JSON-safe geometry or InvalidGeometry."""
    try:
        raw = json.dumps(coordinates)
    except ValueError:
        raw = "[]"
    for coordinate_string in (coordinates, raw):
        try:
            geometry = feature_geometry(feature_type, position, coordinate_string)
        except InvalidGeometry:
            continue
        assert geometry is not None
        json.dumps(geometry, allow_nan=False)
