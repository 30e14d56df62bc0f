"""Katapult normalization, settings and the `check` seam.

Why: the mirror's Katapult rows are a contract (ARCHITECTURE.md §5): points as
[lon, lat], connections between their nodes, attribute lists flattened the same
way every time; the shipped configs must load; `check` must tell a good key from a
bad one without spending tokens.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from syncd.config import parse_config
from syncd.errors import AuthError, ConfigError
from syncd.http import HttpClient, NoAuth
from syncd.sources.katapult import JobCursor, KatapultSettings, KatapultSource, auth_for
from syncd.sources.katapult_records import (
    connection_records,
    flatten_attributes,
    node_record,
)
from tests.conftest import Sandbox

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("attributes", "flat"),
    [
        ({"node_type": {"-a": "pole"}}, {"node_type": "pole"}),
        ({"note": {"-b": "second", "-a": "first"}}, {"note": ["first", "second"]}),
        ({"empty": {}}, {}),
        ({"odd": "not a map"}, {"odd": "not a map"}),
        ({}, {}),
        (None, None),
    ],
)
def test_attribute_lists_are_flattened(attributes: Any, flat: Any) -> None:
    assert flatten_attributes(attributes) == flat


def test_node_is_a_point_of_longitude_then_latitude() -> None:
    node = {
        "id": "-Onode1",
        "latitude": 42.9,
        "longitude": -78.8,
        "attributes": {"scid": {"-i": "001"}},
        "last_updated": "2026-11-23T10:00:00.000Z",
        "_created": {"method": "api"},
    }
    record = node_record(node, "-Ojob")
    assert record.geometry == {"type": "Point", "coordinates": [-78.8, 42.9]}
    assert record.properties == {"attributes": {"scid": "001"}, "_created": {"method": "api"}}
    assert record.remote_updated_at is not None and record.remote_updated_at.year == 2026


@pytest.mark.parametrize("bad", [{"latitude": None}, {"latitude": "42.9"}, {"longitude": True}])
def test_node_without_usable_coordinates_has_no_geometry(bad: dict[str, Any]) -> None:
    node = {"id": "-Onode1", "latitude": 42.9, "longitude": -78.8, **bad}
    with capture_logs() as logs:
        record = node_record(node, "-Ojob")
    assert record.geometry is None
    assert [e["event"] for e in logs] == ["record.invalid_geometry"]


def test_connection_runs_through_its_breakpoints_and_sections_become_points() -> None:
    conn = {
        "id": "-Oconn",
        "node_id_1": "-Oa",
        "node_id_2": "-Ob",
        "breakpoints": [[42.5, -78.5]],
        "attributes": {"connection_type": {"-i": "aerial cable"}},
        "sections": {"-Osec": {"latitude": 42.4, "longitude": -78.4, "attributes": {}}},
    }
    positions = {"-Oa": [-78.0, 42.0], "-Ob": [-79.0, 43.0]}
    line, section = connection_records(conn, "-Ojob", positions, source="s")
    assert line.geometry == {
        "type": "LineString",
        "coordinates": [[-78.0, 42.0], [-78.5, 42.5], [-79.0, 43.0]],
    }
    assert line.properties["attributes"] == {"connection_type": "aerial cable"}
    assert line.properties["section_ids"] == ["-Osec"] and "sections" not in line.properties
    assert (section.kind, section.external_id) == ("section", "-Osec")
    assert section.geometry == {"type": "Point", "coordinates": [-78.4, 42.4]}
    assert section.properties["connection_id"] == "-Oconn"


def test_connection_to_an_unknown_node_has_null_geometry_and_says_so() -> None:
    conn = {"id": "-Oconn", "node_id_1": "-Oa", "node_id_2": "-Ogone"}
    with capture_logs() as logs:
        (line,) = connection_records(conn, "-Ojob", {"-Oa": [0.0, 0.0]}, source="s")
    assert line.geometry is None
    (event,) = logs
    assert event["event"] == "record.invalid_geometry" and event["node_id_2"] == "-Ogone"


@pytest.mark.parametrize(
    "text", [None, "", "{", '{"entry": "x"}', '{"entry": "x", "full_at": "soon"}', "[]"]
)
def test_unreadable_job_cursor_means_a_full_read(text: str | None) -> None:
    assert JobCursor.load(text) is None


def test_job_cursor_round_trips() -> None:
    cursor = JobCursor(entry="abc", nodes_after="2026-11-23T10:00:00.000Z", full_at=12.5)
    assert JobCursor.load(cursor.dump()) == cursor


@pytest.mark.parametrize(
    ("value", "param"),
    [("city:Buffalo", "city:Buffalo"), ({"city": "Buffalo", "phase": "2"}, "city:Buffalo,phase:2")],
)
def test_metadata_filter_as_text_or_table(value: Any, param: str) -> None:
    settings = KatapultSettings.model_validate(
        {"name": "p", "type": "katapult", "api_key": "k" * 20, "metadata_filter": value}
    )
    assert settings.metadata_filter_param() == param


def test_shipped_configs_load(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"KATAPULT_API_KEY": "kp-secret-value", "CALTOPO_CREDENTIAL_ID": "ID"}
    env["KARTORIUM_API_KEY"] = "karta_live_example"
    env["CALTOPO_CREDENTIAL_SECRET"] = "c2VjcmV0"
    for name in ("syncd.example.toml", "demo.toml"):
        path = ROOT / "config" / name
        config = parse_config(tomllib.loads(path.read_text()), file=path, environ=env)
        (poles,) = [s for s in config.sources if s.type == "katapult"]
        assert isinstance(poles, KatapultSettings)
        assert poles.min_interval_ms == 50 and poles.token_bucket and poles.full_every == 3600


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        ({"min_interval": 50}, "min_interval"),
        ({"full_every": "soon"}, "full_every"),
        ({"api_key": ""}, "api_key"),
    ],
)
def test_bad_katapult_keys_are_refused_by_name(extra: dict[str, Any], names: str) -> None:
    raw = {"sources": [{"name": "p", "type": "katapult", "api_key": "k" * 20, **extra}]}
    with pytest.raises(ConfigError, match=names):
        parse_config(raw, file=Path("syncd.toml"), environ={})


async def test_check_accepts_the_key_without_spending_tokens(sandbox: Sandbox) -> None:
    settings = sandbox.katapult_settings()
    async with HttpClient(source="p", auth=auth_for(settings)) as http:
        detail = await KatapultSource(settings, http).check()
    assert detail == "API key accepted"
    assert sandbox.katapult.tokens == sandbox.katapult.allotment


@pytest.mark.parametrize(("key", "status"), [("wrong-key-000000", 401), ("", 400)])
async def test_check_reports_a_bad_key_as_auth_error(
    sandbox: Sandbox, key: str, status: int
) -> None:
    settings = sandbox.katapult_settings(api_key=key or "unused")
    auth = auth_for(settings) if key else NoAuth()  # no key at all: `MISSING API KEY`
    async with HttpClient(source="p", auth=auth) as http:
        with pytest.raises(AuthError) as caught:
            await KatapultSource(settings, http).check()
    assert caught.value.status == status
    assert not key or key not in str(caught.value)


def QueryKeyAuthFor(settings: KatapultSettings) -> Any:
    from syncd.sources.katapult import auth_for

    return auth_for(settings)
