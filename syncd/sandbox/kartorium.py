"""A local Kartorium Client API simulator served over real HTTP on loopback.

Why: the Kartorium source must be exercised against what matters for a correct mirror
(bearer keys with per-route scopes, 401/403 `missing_scope`/400/404 answers, integer
ids, marker/line/polygon features whose geometry lives in a `coordinateString`
property) without a provisioned key. Like the real API as far as the page tells
(kartorium-client-api.txt): list responses are bare JSON arrays (or `{"data": [...]}`
when `envelope = "data"`), there is no pagination and no timestamps, and editing a
feature property does not change the feature row.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from syncd.sandbox import faulty
from syncd.sandbox.caltopo import Fault, LoggedRequest

PREFIX = "/kartorium"
API = f"{PREFIX}/api/v1"
DEMO_KEY = "karta_live_sandbox_demo_key_0001"
READ_SCOPES = frozenset({"projects:read", "scenes:read", "features:read"})

Json = dict[str, Any]

# (pattern, scope the route needs); ids are matched loosely so bad ids can get a 400.
_ROUTES: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile(rf"^{API}/client/projects$"), "projects", "projects:read"),
    (re.compile(rf"^{API}/client/projects/([^/]+)$"), "project", "projects:read"),
    (re.compile(rf"^{API}/client/projects/([^/]+)/scenes$"), "scenes", "scenes:read"),
    (re.compile(rf"^{API}/client/projects/([^/]+)/features$"), "features", "features:read"),
    (re.compile(rf"^{API}/client/scenes/([^/]+)/features$"), "scene_features", "features:read"),
    (re.compile(rf"^{API}/client/features/([^/]+)/properties$"), "properties", "features:read"),
    (re.compile(rf"^{API}/client/organization$"), "organization", "projects:read"),
]


@dataclass
class KartoriumWorld:
    """One organization's projects, scenes, features and feature properties."""

    keys: dict[str, frozenset[str]] = field(default_factory=lambda: {DEMO_KEY: READ_SCOPES})
    envelope: str = "bare"  # bare | data
    faults: list[Fault] = field(default_factory=list)
    request_log: list[LoggedRequest] = field(default_factory=list)
    projects: dict[int, Json] = field(default_factory=dict)
    scenes: dict[int, Json] = field(default_factory=dict)
    features: dict[int, Json] = field(default_factory=dict)
    properties: dict[int, Json] = field(default_factory=dict)
    _next_id: int = 100
    _property_ids: dict[int, list[int]] = field(default_factory=dict)
    """Feature id -> its property ids: a 10k-feature benchmark asks for each feature's
    properties, and scanning every property per request made the simulator the cost."""

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    # ---- mutations -------------------------------------------------------------------

    def add_project(self, title: str, **extra: Any) -> int:
        pid = self._new_id()
        self.projects[pid] = {"id": pid, "title": title, "description": "", **extra}
        return pid

    def delete_project(self, pid: int) -> None:
        """Delete a project with its scenes, features and their properties."""
        del self.projects[pid]
        for sid in [s for s, row in self.scenes.items() if row["projectID"] == pid]:
            self.delete_scene(sid)

    def add_scene(self, pid: int, name: str, scene_type: str = "Map", **extra: Any) -> int:
        if pid not in self.projects:
            raise KeyError(f"no project {pid}")
        sid = self._new_id()
        self.scenes[sid] = {
            "id": sid,
            "projectID": pid,
            "name": name,
            "type": scene_type,
            "visible": True,
            "description": "",
            **extra,
        }
        return sid

    def edit_scene(self, sid: int, **changes: Any) -> None:
        self.scenes[sid].update(copy.deepcopy(changes))

    def delete_scene(self, sid: int) -> None:
        del self.scenes[sid]
        for fid in [f for f, row in self.features.items() if row["sceneID"] == sid]:
            self.delete_feature(fid)

    def add_feature(
        self,
        sid: int,
        feature_type: str,
        name: str,
        *,
        position: Any = (0.0, 0.0, 0.0),
        coordinates: Any = None,
        props: dict[str, tuple[str, str]] | None = None,
        **extra: Any,
    ) -> int:
        """A feature row plus its properties; `coordinates` becomes its coordinateString."""
        scene = self.scenes[sid]
        fid = self._new_id()
        self.features[fid] = {
            "id": fid,
            "sceneID": sid,
            "projectID": scene["projectID"],
            "type": feature_type,
            "name": name,
            "description": "",
            "position": list(position) if isinstance(position, tuple) else position,
            "rotation": [0, 0, 0],
            "scale": [1, 1, 1],
            "visible": True,
            **extra,
        }
        if coordinates is not None:
            value = coordinates if isinstance(coordinates, str) else json.dumps(coordinates)
            self.add_property(fid, "string", "coordinateString", value)
        for key, (ptype, value) in (props or {}).items():
            self.add_property(fid, ptype, key, value)
        return fid

    def edit_feature(self, fid: int, **changes: Any) -> None:
        self.features[fid].update(copy.deepcopy(changes))

    def delete_feature(self, fid: int) -> None:
        del self.features[fid]
        for pid in self._property_ids.pop(fid, []):
            del self.properties[pid]

    def add_property(self, fid: int, ptype: str, key: str, value: str) -> int:
        if fid not in self.features:
            raise KeyError(f"no feature {fid}")
        pid = self._new_id()
        self.properties[pid] = {
            "id": pid,
            "featureID": fid,
            "type": ptype,
            "key": key,
            "value": value,
        }
        self._property_ids.setdefault(fid, []).append(pid)
        return pid

    def set_property(self, fid: int, key: str, value: str) -> None:
        """PATCH a feature property's value; the feature row itself does not change."""
        for row in self.feature_properties(fid):
            if row["key"] == key:
                row["value"] = value
                return
        raise KeyError(f"feature {fid} has no property {key}")

    def feature_properties(self, fid: int) -> list[Json]:
        return [self.properties[pid] for pid in self._property_ids.get(fid, [])]

    def add_fault(self, fault: Fault) -> None:
        self.faults.append(fault)

    def requests_to(self, fragment: str) -> int:
        return sum(1 for r in self.request_log if fragment in r.path)


# ---- HTTP ----------------------------------------------------------------------------


def _error(status: int, error: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": error, "message": message, **extra}, status=status)


def _listing(world: KartoriumWorld, rows: list[Json]) -> web.Response:
    data = [copy.deepcopy(r) for r in sorted(rows, key=lambda r: int(r["id"]))]
    return web.json_response(data if world.envelope == "bare" else {"data": data})


def create_app(world: KartoriumWorld) -> web.Application:
    """The simulator app: routes match the full path, so it works standalone or mounted."""

    async def handle(request: web.Request) -> web.StreamResponse:
        status = 0
        try:
            fault = faulty.pick(world.faults, request.path)
            resp = await faulty.respond(fault, request, _fault_error) if fault else None
            if resp is None:
                resp = _answer(world, request)
                if fault is not None and fault.kind == "drip":
                    resp = await faulty.drip(request, resp, fault.delay)
            status = faulty.answered_status(request, resp)
            return resp
        finally:
            world.request_log.append(
                LoggedRequest(request.method, request.path, None, status, time.monotonic())
            )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def _fault_error(fault: Fault) -> web.Response:
    return _error(fault.status, "simulated_fault", "simulated fault")


def _answer(world: KartoriumWorld, request: web.Request) -> web.Response:  # noqa: PLR0911
    route = next(
        ((m, name, scope) for p, name, scope in _ROUTES if (m := p.match(request.path))), None
    )
    if route is None or request.method != "GET":
        return _error(404, "not_found", "route not found")
    header = request.headers.get("Authorization", "")
    key = header.removeprefix("Bearer ") if header.startswith("Bearer ") else None
    key = key or request.query.get("api_key")  # the page's discouraged query form
    if key is None or key not in world.keys:
        return _error(401, "unauthorized", "missing or invalid API key")
    match, name, scope = route
    if scope not in world.keys[key]:
        return _error(403, "missing_scope", "API key lacks a required scope", missing_scope=scope)
    if name == "projects":
        return _listing(world, list(world.projects.values()))
    if name == "organization":
        return web.json_response({"id": 1, "name": "Sandbox Org"})
    raw = match.group(1)
    if not raw.isdigit() or int(raw) <= 0:
        return _error(400, "invalid_id", "ids are positive integers")
    oid = int(raw)
    if name == "project":
        row = world.projects.get(oid)
        return _error(404, "not_found", "not found") if row is None else web.json_response(row)
    if name in ("scenes", "features"):
        if oid not in world.projects:
            return _error(404, "not_found", "project not found")
        table = world.scenes if name == "scenes" else world.features
        return _listing(world, [r for r in table.values() if r["projectID"] == oid])
    if name == "scene_features":
        if oid not in world.scenes:
            return _error(404, "not_found", "scene not found")
        return _listing(world, [r for r in world.features.values() if r["sceneID"] == oid])
    if oid not in world.features:
        return _error(404, "not_found", "feature not found")
    return _listing(world, world.feature_properties(oid))


# ---- demo data -----------------------------------------------------------------------


def populate(
    world: KartoriumWorld, *, projects: int = 2, features_per_scene: int = 6, seed: int = 0
) -> None:
    """Projects with a Map scene of markers, lines and polygons and a Standard scene."""
    rng = random.Random(seed)
    for p in range(projects):
        pid = world.add_project(f"Digital Twin {p + 1}")
        sid = world.add_scene(pid, "Site map", "Map")
        world.add_scene(pid, "Overview", "Standard")
        for i in range(features_per_scene):
            lon, lat = -105.27 + rng.uniform(-0.01, 0.01), 40.015 + rng.uniform(-0.01, 0.01)
            kind = ("marker", "line", "polygon")[i % 3]
            display = {"color": ("string", rng.choice(["#ff0000", "#00ff00", "#0000ff"]))}
            if kind == "marker":
                world.add_feature(
                    sid,
                    kind,
                    f"Service Point {i + 1}",
                    position=(round(lon, 6), round(lat, 6), 0.0),
                    props={"displayType": ("string", "label"), **display},
                )
                continue
            pts = [
                [
                    round(lon + rng.uniform(-0.002, 0.002), 6),
                    round(lat + rng.uniform(-0.002, 0.002), 6),
                    0,
                ]
                for _ in range(3 if kind == "polygon" else 2)
            ]
            world.add_feature(sid, kind, f"{kind.title()} {i + 1}", coordinates=pts, props=display)


async def mutate_forever(world: KartoriumWorld, *, every: float = 5.0, seed: int = 0) -> None:
    """Keep changing the world at random (features, properties, scenes), for the demo."""
    rng = random.Random(seed)
    while True:
        await asyncio.sleep(every)
        maps = [sid for sid, row in world.scenes.items() if row["type"] == "Map"]
        if not maps:
            populate(world, projects=1, features_per_scene=6, seed=rng.randint(0, 999))
            continue
        sid = rng.choice(maps)
        features = [fid for fid, row in world.features.items() if row["sceneID"] == sid]
        op = rng.choice(["add", "delete", "move", "rename", "scene"]) if features else "add"
        if op == "add":
            lon, lat = -105.27 + rng.uniform(-0.01, 0.01), 40.015 + rng.uniform(-0.01, 0.01)
            world.add_feature(
                sid, "marker", f"Point {rng.randint(1, 999)}", position=(lon, lat, 0.0)
            )
        elif op == "delete":
            world.delete_feature(rng.choice(features))
        elif op == "rename":
            world.edit_feature(rng.choice(features), name=f"Renamed {rng.randint(1, 999)}")
        elif op == "scene":
            world.edit_scene(sid, description=f"{rng.random():.3f}")
        else:
            fid = rng.choice(features)
            row = world.features[fid]
            if row["type"] == "marker":
                lon, lat, alt = row["position"]
                world.edit_feature(fid, position=[lon + rng.uniform(-0.001, 0.001), lat, alt])
            else:
                pts = [
                    [
                        round(-105.27 + rng.uniform(-0.01, 0.01), 6),
                        round(40.015 + rng.uniform(-0.01, 0.01), 6),
                    ]
                    for _ in range(3)
                ]
                world.set_property(fid, "coordinateString", json.dumps(pts))
