"""The Kartorium simulator answers like the page says: bearer keys, per-route scopes, ids.

Why: the source's tests are only as good as the simulator they run against.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from syncd.errors import AuthError
from syncd.http import BearerAuth, HttpClient
from syncd.sandbox.kartorium import API, DEMO_KEY, populate
from syncd.sources.kartorium import KartoriumSource
from tests.conftest import Sandbox


async def get(sandbox: Sandbox, path: str, key: str | None = DEMO_KEY) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{sandbox.url}{API}{path}", headers=headers) as resp,
    ):
        return resp.status, await resp.json()


@pytest.mark.parametrize(
    ("path", "scope"),
    [
        ("/client/projects", "projects:read"),
        ("/client/projects/{p}/scenes", "scenes:read"),
        ("/client/projects/{p}/features", "features:read"),
        ("/client/scenes/{s}/features", "features:read"),
        ("/client/features/{f}/properties", "features:read"),
    ],
)
async def test_each_route_needs_its_scope(sandbox: Sandbox, path: str, scope: str) -> None:
    world = sandbox.kartorium
    p = world.add_project("P")
    s = world.add_scene(p, "S")
    f = world.add_feature(s, "marker", "M", position=(1.0, 2.0, 0.0))
    path = path.format(p=p, s=s, f=f)
    world.keys["limited"] = frozenset({"projects:read", "scenes:read", "features:read"} - {scope})

    status, body = await get(sandbox, path, "limited")
    assert (status, body["error"], body["missing_scope"]) == (403, "missing_scope", scope)
    status, _ = await get(sandbox, path)
    assert status == 200


@pytest.mark.parametrize(
    ("path", "key", "status"),
    [
        ("/client/projects", None, 401),
        ("/client/projects", "karta_live_nope", 401),
        ("/client/projects/abc/scenes", DEMO_KEY, 400),
        ("/client/projects/0/features", DEMO_KEY, 400),
        ("/client/projects/999999/features", DEMO_KEY, 404),
        ("/client/features/999999/properties", DEMO_KEY, 404),
    ],
)
async def test_errors(sandbox: Sandbox, path: str, key: str | None, status: int) -> None:
    assert (await get(sandbox, path, key))[0] == status


async def test_world_mutations_show_in_listings(sandbox: Sandbox) -> None:
    world = sandbox.kartorium
    populate(world, projects=2, features_per_scene=3, seed=1)
    p = next(iter(world.projects))
    _, features = await get(sandbox, f"/client/projects/{p}/features")
    assert {f["type"] for f in features} == {"marker", "line", "polygon"}
    line = next(f["id"] for f in features if f["type"] == "line")
    _, props = await get(sandbox, f"/client/features/{line}/properties")
    assert any(prop["key"] == "coordinateString" for prop in props)

    world.delete_feature(line)
    assert (await get(sandbox, f"/client/features/{line}/properties"))[0] == 404
    world.delete_project(p)
    _, projects = await get(sandbox, "/client/projects")
    assert p not in {row["id"] for row in projects}
    assert not [f for f in world.features.values() if f["projectID"] == p]


async def test_check_reports_projects_or_raises_auth_error(sandbox: Sandbox) -> None:
    populate(sandbox.kartorium, projects=3, features_per_scene=1)
    settings = sandbox.kartorium_settings()
    async with HttpClient(source="twin", auth=BearerAuth(DEMO_KEY)) as http:
        assert await KartoriumSource(settings, http).check() == "3 projects visible"
    async with HttpClient(source="twin", auth=BearerAuth("karta_live_bad")) as http:
        with pytest.raises(AuthError):
            await KartoriumSource(settings, http).check()
