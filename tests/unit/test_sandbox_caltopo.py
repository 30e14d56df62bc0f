"""The CalTopo simulator, exercised over real HTTP on loopback.

Why: the daemon's CalTopo tests trust this simulator to behave like the documented
API (signing, cursors, partial deltas, ids maps); these tests pin that behaviour.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from syncd.sandbox.caltopo import (
    PREFIX,
    CalTopoWorld,
    Fault,
    create_app,
    expected_signature,
    mutate_forever,
    populate,
)

Json = dict[str, Any]


def sign(method: str, url: str, expires: int, payload_string: str, credential_secret: str) -> str:
    """A local copy of the reference ``sign()`` from caltopo-team-api.txt."""
    message = f"{method} {url}\n{expires}\n{payload_string}"
    secret = base64.b64decode(credential_secret)
    signature = hmac.new(secret, message.encode(), "sha256").digest()
    return base64.b64encode(signature).decode()


class Client:
    """A minimal signed client, deliberately independent of the daemon's own client."""

    def __init__(self, world: CalTopoWorld, server: TestServer, session: aiohttp.ClientSession):
        self.world = world
        self.server = server
        self.session = session

    async def raw(
        self,
        path: str,
        *,
        expires: int | None = None,
        secret: str | None = None,
        cred: str | None = None,
        method: str = "GET",
    ) -> tuple[int, bytes]:
        full = PREFIX + path
        expires = expires if expires is not None else int(time.time() * 1000) + 120_000
        params = {
            "id": cred or self.world.credential_id,
            "expires": str(expires),
            "signature": sign(method, full, expires, "", secret or self.world.credential_secret),
        }
        async with self.session.request(method, self.server.make_url(full), params=params) as r:
            return r.status, await r.read()

    async def get(self, path: str, **kw: Any) -> tuple[int, Json]:
        status, body = await self.raw(path, **kw)
        return status, json.loads(body)

    async def map_since(self, map_id: str, ts: int) -> Json:
        status, body = await self.get(f"/api/v1/map/{map_id}/since/{ts}")
        assert status == 200, body
        assert body["status"] == "ok"
        result: Json = body["result"]
        assert result["timestamp"] == body["timestamp"]
        return result

    async def acct_since(self, ts: int) -> Json:
        status, body = await self.get(f"/api/v1/acct/{self.world.team_id}/since/{ts}")
        assert status == 200, body
        result: Json = body["result"]
        return result


@pytest.fixture
async def world() -> CalTopoWorld:
    w = CalTopoWorld(seed=1)
    populate(w, maps=2, objects_per_map=12, seed=2)
    return w


async def _serve(app: web.Application, world: CalTopoWorld) -> AsyncIterator[Client]:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Client(world, server, session)
    finally:
        await server.close()


@pytest.fixture
async def client(world: CalTopoWorld) -> AsyncIterator[Client]:
    async for c in _serve(create_app(world), world):
        yield c


def _by_key(features: list[Json]) -> dict[tuple[str, str], Json]:
    return {(f["properties"]["class"], f["id"]): f for f in features}


# ---- signing and auth ------------------------------------------------------------------


def test_published_vector() -> None:
    got = expected_signature(
        "POST", "/api/v1/map/map123/LiveTrack", 1700000010000, '{"type":"Feature"}', "c2VjcmV0"
    )
    assert got == "4c5G2oSEYaecJyf81tFERXDlcClrG4EZZPYWysPN+4Q="
    assert got == sign(
        "POST", "/api/v1/map/map123/LiveTrack", 1700000010000, '{"type":"Feature"}', "c2VjcmV0"
    )


def _assert_error(status: int, body: Json, code: int) -> None:
    assert status == code
    assert body["status"] == "error" and body["code"] == code
    assert isinstance(body["message"], str) and isinstance(body["timestamp"], int)


async def test_good_request_then_bad_signature_is_401(client: Client) -> None:
    map_id = client.world.map_ids()[0]
    status, _ = await client.get(f"/api/v1/map/{map_id}/since/0")
    assert status == 200
    wrong = base64.b64encode(b"not-the-secret").decode()
    status, body = await client.get(f"/api/v1/map/{map_id}/since/0", secret=wrong)
    _assert_error(status, body, 401)
    assert body["message"] == "login required"
    status, body = await client.get(f"/api/v1/map/{map_id}/since/0", cred="OTHERCRED123")
    _assert_error(status, body, 401)


async def test_signature_covers_the_since_value(client: Client) -> None:
    map_id = client.world.map_ids()[0]
    expires = int(time.time() * 1000) + 60_000
    sig = sign(
        "GET", f"{PREFIX}/api/v1/map/{map_id}/since/0", expires, "", client.world.credential_secret
    )
    params = {"id": client.world.credential_id, "expires": str(expires), "signature": sig}
    url = client.server.make_url(f"{PREFIX}/api/v1/map/{map_id}/since/5")
    async with client.session.get(url, params=params) as resp:
        assert resp.status == 401


async def test_expired_is_401(client: Client) -> None:
    map_id = client.world.map_ids()[0]
    past = int(time.time() * 1000) - 1
    status, body = await client.get(f"/api/v1/map/{map_id}/since/0", expires=past)
    _assert_error(status, body, 401)


async def test_missing_params_is_401(client: Client) -> None:
    url = client.server.make_url(f"{PREFIX}/api/v1/acct/{client.world.team_id}/since/0")
    async with client.session.get(url) as resp:
        assert resp.status == 401
        assert (await resp.json())["code"] == 401


async def test_revoked_is_401(client: Client) -> None:
    client.world.revoke()
    status, body = await client.get(f"/api/v1/acct/{client.world.team_id}/since/0")
    _assert_error(status, body, 401)
    assert client.world.request_log[-1].status == 401


async def test_wrong_team_403_and_unknown_routes_404(client: Client) -> None:
    status, body = await client.get("/api/v1/acct/OTHER1/since/0")
    _assert_error(status, body, 403)
    status, body = await client.get("/api/v1/map/NOPE00/since/0")
    _assert_error(status, body, 404)
    status, body = await client.get("/api/v1/whatever")
    _assert_error(status, body, 404)
    status, body = await client.get(
        f"/api/v1/map/{client.world.map_ids()[0]}/since/0", method="DELETE"
    )
    _assert_error(status, body, 404)


# ---- full reads and empty deltas ----------------------------------------------------------


async def test_since_zero_returns_everything_with_ids(client: Client) -> None:
    world = client.world
    acct = await client.acct_since(0)
    classes = {f["properties"]["class"] for f in acct["features"]}
    assert classes == {"CollaborativeMap", "UserFolder"}
    assert sorted(acct["ids"]["CollaborativeMap"]) == sorted(world.map_ids())
    assert len(acct["ids"]["UserFolder"]) >= 1
    for key in ("accounts", "groups", "rels"):
        assert isinstance(acct[key], list)
    maps = [f for f in acct["features"] if f["properties"]["class"] == "CollaborativeMap"]
    for f in maps:
        assert f["geometry"] is None
        assert f["properties"]["accountId"] == world.team_id
        assert f["properties"]["sharing"] == "SECURE" and "folderId" in f["properties"]

    map_id = world.map_ids()[0]
    result = await client.map_since(map_id, 0)
    assert result["state"]["type"] == "FeatureCollection"
    assert _by_key(result["state"]["features"]) == world.live_objects(map_id)
    ids = {(cls, i) for cls, lst in result["ids"].items() for i in lst}
    assert ids == set(world.live_objects(map_id))


async def test_populate_is_realistic(world: CalTopoWorld) -> None:
    live = world.live_objects(world.map_ids()[0])
    classes = {cls for cls, _ in live}
    assert {"Marker", "Shape", "Folder", "AppTrack"} <= classes
    folder = next(i for cls, i in live if cls == "Folder")
    assert any(f["properties"].get("folderId") == folder for f in live.values())
    track = next(f for (cls, _), f in live.items() if cls == "AppTrack")
    assert track["geometry"]["type"] == "LineString"
    assert all(len(p) == 4 for p in track["geometry"]["coordinates"])
    geoms = {f["geometry"]["type"] for f in live.values() if f["geometry"]}
    assert {"Point", "LineString", "Polygon"} <= geoms
    marker = next(f for (cls, _), f in live.items() if cls == "Marker")
    assert {"marker-color", "marker-symbol", "title", "updated"} <= set(marker["properties"])


async def test_second_call_returns_nothing_and_no_ids(client: Client) -> None:
    map_id = client.world.map_ids()[0]
    first = await client.map_since(map_id, 0)
    again = await client.map_since(map_id, first["timestamp"])
    assert again["state"]["features"] == [] and "ids" not in again
    acct = await client.acct_since(0)
    acct2 = await client.acct_since(acct["timestamp"])
    assert acct2["features"] == [] and "ids" not in acct2


async def test_ids_probability_one_always_sends_ids() -> None:
    world = CalTopoWorld(ids_probability=1.0)
    map_id = world.add_map("m")
    world.add_object(map_id, "Marker", {"type": "Point", "coordinates": [1, 2]}, {})
    async for c in _serve(create_app(world), world):
        t = (await c.map_since(map_id, 0))["timestamp"]
        again = await c.map_since(map_id, t)
        assert again["state"]["features"] == []
        assert len(again["ids"]["Marker"]) == 1


# ---- partial deltas -----------------------------------------------------------------------


def _first(world: CalTopoWorld, map_id: str, cls: str) -> tuple[str, Json]:
    key, feat = next((k, f) for k, f in world.live_objects(map_id).items() if k[0] == cls)
    return key[1], feat


async def test_move_is_geometry_only_delta(client: Client) -> None:
    world, map_id = client.world, client.world.map_ids()[0]
    t = (await client.map_since(map_id, 0))["timestamp"]
    marker, _ = _first(world, map_id, "Marker")
    world.move_object(map_id, "Marker", marker, {"type": "Point", "coordinates": [-121, 38]})
    result = await client.map_since(map_id, t)
    [feat] = result["state"]["features"]
    assert feat["id"] == marker and feat["geometry"]["coordinates"] == [-121, 38]
    assert "title" not in feat["properties"] and feat["properties"]["nop"] is True
    assert feat["properties"]["class"] == "Marker" and feat["properties"]["updated"] > t
    assert "ids" not in result
    # From before the object existed, a client gets the full feature instead.
    full = _by_key((await client.map_since(map_id, 0))["state"]["features"])
    assert full["Marker", marker]["properties"]["title"] != ""  # populate titles are non-empty


async def test_append_is_incremental(client: Client) -> None:
    world, map_id = client.world, client.world.map_ids()[0]
    t = (await client.map_since(map_id, 0))["timestamp"]
    track, feat = _first(world, map_id, "AppTrack")
    before = len(feat["geometry"]["coordinates"])
    new = [[-120.1, 39.1, 1900.0, 1_800_000_000_000], [-120.2, 39.2, 1901.0, 1_800_000_005_000]]
    world.append_track_points(map_id, "AppTrack", track, new)
    [delta] = (await client.map_since(map_id, t))["state"]["features"]
    assert delta["geometry"] == {"type": "LineString", "coordinates": new, "incremental": True}
    assert "title" not in delta["properties"] and delta["properties"]["class"] == "AppTrack"
    after = world.live_objects(map_id)["AppTrack", track]["geometry"]["coordinates"]
    assert len(after) == before + 2 and after[-2:] == new


async def test_two_changes_or_new_object_send_full_feature(client: Client) -> None:
    world, map_id = client.world, client.world.map_ids()[0]
    t = (await client.map_since(map_id, 0))["timestamp"]
    track, _ = _first(world, map_id, "AppTrack")
    world.append_track_points(map_id, "AppTrack", track, [[-120.3, 39.3, 1.0, 1]])
    world.append_track_points(map_id, "AppTrack", track, [[-120.4, 39.4, 1.0, 2]])
    new = world.add_object(map_id, "Marker", {"type": "Point", "coordinates": [0, 0]}, {})
    world.move_object(map_id, "Marker", new, {"type": "Point", "coordinates": [1, 1]})
    result = await client.map_since(map_id, t)
    got = _by_key(result["state"]["features"])
    live = world.live_objects(map_id)
    assert got == {k: live[k] for k in (("AppTrack", track), ("Marker", new))}
    assert got["Marker", new]["properties"]["title"] == ""
    assert "incremental" not in got["AppTrack", track]["geometry"]
    assert new in result["ids"]["Marker"]


async def test_props_edit_sends_full_properties_without_geometry(client: Client) -> None:
    world, map_id = client.world, client.world.map_ids()[0]
    t = (await client.map_since(map_id, 0))["timestamp"]
    shape, feat = _first(world, map_id, "Shape")
    world.edit_object(map_id, "Shape", shape, {"title": "Renamed", "stroke": "#123456"})
    [delta] = (await client.map_since(map_id, t))["state"]["features"]
    assert "geometry" not in delta
    assert delta["properties"] == world.live_objects(map_id)["Shape", shape]["properties"]
    assert delta["properties"]["title"] == "Renamed"
    assert (
        delta["properties"]["fill" if "fill" in feat["properties"] else "stroke-width"]
        == feat["properties"]["fill" if "fill" in feat["properties"] else "stroke-width"]
    )


async def test_delete_shows_only_in_ids(client: Client) -> None:
    world, map_id = client.world, client.world.map_ids()[0]
    t = (await client.map_since(map_id, 0))["timestamp"]
    marker, _ = _first(world, map_id, "Marker")
    world.delete_object(map_id, "Marker", marker)
    result = await client.map_since(map_id, t)
    assert result["state"]["features"] == []
    assert marker not in result["ids"].get("Marker", [])
    ids = {(cls, i) for cls, lst in result["ids"].items() for i in lst}
    assert ids == set(world.live_objects(map_id))


async def test_retype_apptrack_to_shape_keeps_id(client: Client) -> None:
    world, map_id = client.world, client.world.map_ids()[0]
    t = (await client.map_since(map_id, 0))["timestamp"]
    track, old = _first(world, map_id, "AppTrack")
    world.retype_object(map_id, "AppTrack", track, "Shape")
    result = await client.map_since(map_id, t)
    [feat] = result["state"]["features"]
    assert feat["id"] == track and feat["properties"]["class"] == "Shape"
    assert feat["geometry"] == old["geometry"]
    assert track not in result["ids"].get("AppTrack", [])
    assert track in result["ids"]["Shape"]


async def test_map_delete_and_rename(client: Client) -> None:
    world = client.world
    gone, kept = world.map_ids()
    t = (await client.acct_since(0))["timestamp"]
    world.rename_map(kept, "New title")
    world.delete_map(gone)
    acct = await client.acct_since(t)
    [feat] = acct["features"]
    assert feat["id"] == kept and feat["properties"]["title"] == "New title"
    assert acct["ids"]["CollaborativeMap"] == [kept]
    status, body = await client.get(f"/api/v1/map/{gone}/since/0")
    _assert_error(status, body, 404)


# ---- clock ----------------------------------------------------------------------------


async def test_timestamps_increase_and_later_mutations_show_up(client: Client) -> None:
    world, map_id = client.world, client.world.map_ids()[0]
    marker, _ = _first(world, map_id, "Marker")
    stamps = []
    t = 0
    for i in range(5):
        result = await client.map_since(map_id, t)
        if t:
            [feat] = result["state"]["features"]
            assert feat["properties"]["description"] == f"v{i - 1}"
            assert feat["properties"]["updated"] > t
        t = result["timestamp"]
        stamps.append(t)
        world.edit_object(map_id, "Marker", marker, {"description": f"v{i}"})
    assert stamps == sorted(set(stamps))
    values = [world.now() for _ in range(1000)]
    assert values == sorted(set(values))


# ---- faults and the request log -----------------------------------------------------------


async def test_status_fault_counts_and_fires_before_auth(client: Client) -> None:
    world, map_id = client.world, client.world.map_ids()[0]
    world.add_fault(
        Fault(match=f"/map/{map_id}/", status=503, times=2, headers={"Retry-After": "1"})
    )
    wrong = base64.b64encode(b"wrong").decode()
    status, body = await client.get(f"/api/v1/map/{map_id}/since/0", secret=wrong)
    _assert_error(status, body, 503)
    status, _ = await client.get(f"/api/v1/acct/{world.team_id}/since/0")
    assert status == 200  # does not match
    status, body = await client.get(f"/api/v1/map/{map_id}/since/0")
    _assert_error(status, body, 503)
    status, _ = await client.get(f"/api/v1/map/{map_id}/since/0")
    assert status == 200
    assert [r.status for r in world.request_log] == [503, 200, 503, 200]
    assert world.request_log[0].since == 0 and world.request_log[0].method == "GET"
    assert world.request_log[0].path == f"{PREFIX}/api/v1/map/{map_id}/since/0"
    ats = [r.at for r in world.request_log]
    assert ats == sorted(ats)


async def test_empty_and_invalid_json_faults(client: Client) -> None:
    world = client.world
    world.add_fault(Fault(match="", kind="empty"))
    world.add_fault(Fault(match="", kind="invalid_json", times=-1))
    path = f"/api/v1/acct/{world.team_id}/since/0"
    assert await client.raw(path) == (200, b"")
    for _ in range(3):
        assert await client.raw(path) == (200, b"{not json")
    assert world.faults[1].times == -1


async def test_hang_then_answers(client: Client) -> None:
    client.world.add_fault(Fault(match="/acct/", kind="hang", delay=0.05))
    start = time.monotonic()
    status, _ = await client.get(f"/api/v1/acct/{client.world.team_id}/since/0")
    assert status == 200 and time.monotonic() - start >= 0.045


@pytest.mark.parametrize("kind", ["truncate", "reset"])
async def test_truncate_and_reset_break_the_connection(client: Client, kind: str) -> None:
    # times=-1: aiohttp's client silently retries a GET once after a disconnect.
    world = client.world
    world.add_fault(Fault(match="/acct/", kind=kind, times=-1))
    with pytest.raises(aiohttp.ClientError):
        await client.raw(f"/api/v1/acct/{world.team_id}/since/0")
    assert world.request_log and {r.status for r in world.request_log} == {0}
    world.faults.clear()
    status, _ = await client.get(f"/api/v1/acct/{world.team_id}/since/0")
    assert status == 200


async def test_mountable_as_subapp(world: CalTopoWorld) -> None:
    root = web.Application()
    root.add_subapp(PREFIX, create_app(world))
    async for c in _serve(root, world):
        assert (await c.acct_since(0))["features"]
        status, _ = await c.get("/api/v1/nothing")
        assert status == 404


# ---- a mirror built from deltas converges on the world --------------------------------------


def _merge(store: dict[tuple[str, str], Json], result: Json, features: list[Json]) -> None:
    """Apply a delta the way FACTS.md says a mirror must."""
    for f in features:
        key = (f["properties"]["class"], f["id"])
        old = store.get(key)
        if old is None or "title" in f["properties"]:
            new = copy.deepcopy(f)
            if "geometry" not in f and old is not None:
                new["geometry"] = old["geometry"]
            store[key] = new
            continue
        old["properties"]["updated"] = f["properties"]["updated"]
        geom = f["geometry"]
        if geom.pop("incremental", False):
            last = old["geometry"]["coordinates"][-1][3]
            old["geometry"]["coordinates"] += [p for p in geom["coordinates"] if p[3] > last]
        else:
            old["geometry"] = geom
    if "ids" in result:
        live = {(cls, i) for cls, lst in result["ids"].items() for i in lst}
        for key in set(store) - live:
            del store[key]


async def test_mirror_converges_under_mutate_forever(client: Client) -> None:
    world = client.world
    mirrors: dict[str, dict[tuple[str, str], Json]] = {}
    cursors: dict[str, int] = {}
    task = asyncio.create_task(mutate_forever(world, every=0, seed=3))

    async def sync() -> None:
        acct = await client.acct_since(0)
        for map_id in acct["ids"]["CollaborativeMap"]:
            status, body = await client.get(f"/api/v1/map/{map_id}/since/{cursors.get(map_id, 0)}")
            if status == 404:  # deleted between the two reads
                continue
            result = body["result"]
            _merge(mirrors.setdefault(map_id, {}), result, result["state"]["features"])
            cursors[map_id] = result["timestamp"]

    try:
        for _ in range(15):
            await sync()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await sync()
    assert world.map_ids()
    for map_id in world.map_ids():
        assert mirrors[map_id] == world.live_objects(map_id)
    kinds = {c.kind for m in world._maps.values() for o in m.values() for c in o.changes}
    assert {"geometry", "append", "props"} <= kinds
