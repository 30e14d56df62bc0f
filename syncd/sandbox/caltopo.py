"""A local CalTopo Team API simulator served over real HTTP on loopback.

Why: the daemon's CalTopo source must be exercised against the behaviour that
matters for a correct mirror (signed requests, ``since`` cursors, partial deltas,
``ids`` maps, (class, id) identity, flaky networks) without touching caltopo.com.
The simulator is deliberately deterministic: ids come from a seeded RNG and the
server clock is strictly increasing, so tests can reason about "changed after T".
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import hmac
import json
import random
import re
import string
import time
import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import orjson
from aiohttp import web

from syncd.sandbox import faulty

PREFIX = "/caltopo"

_ROUTE = re.compile(rf"^{re.escape(PREFIX)}/api/v1/(acct|map)/([^/]+)/since/(\d+)$")
_ACCOUNT_CLASSES = ("CollaborativeMap", "UserFolder")
_HISTORY_CAP = 32  # older changes are collapsed so a long demo does not grow without bound

Json = dict[str, Any]
_Ids = dict[str, list[str]]


def expected_signature(method: str, path: str, expires: int, payload: str, secret: str) -> str:
    """Sign exactly like the page's reference ``sign()``; the server side of the check."""
    message = f"{method} {path}\n{expires}\n{payload}"
    digest = hmac.new(base64.b64decode(secret), message.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


@dataclass
class Fault:
    """An injected failure: the first live fault whose ``match`` is in the path fires.

    Note: aiohttp's client retries an idempotent request once after a disconnect, so a
    single "reset" is invisible to it; use times >= 2 (or -1) to make it surface.
    """

    match: str
    kind: str = "status"  # status | empty | invalid_json | json | hang | drip | truncate | reset
    status: int = 500
    times: int = 1  # -1 = forever
    delay: float = 0.0  # "hang": seconds before answering; "drip": seconds between chunks
    headers: dict[str, str] = field(default_factory=dict)  # e.g. Retry-After for "status"
    body: Any = None  # for "json": a valid JSON answer of the wrong shape


@dataclass(frozen=True)
class LoggedRequest:
    """One answered request, so tests can assert on what the daemon actually asked."""

    method: str
    path: str
    since: int | None
    status: int
    at: float


@dataclass
class _Change:
    """One entry of an object's history; the delta shape depends on what came after ``ts``."""

    at: int
    kind: str  # create | full | props | geometry | append
    points: list[list[float]] | None = None


@dataclass
class _Obj:
    """A live object (account or map scope) with its change history."""

    cls: str
    id: str
    geometry: Json | None
    properties: Json
    changes: list[_Change]

    def record(self, at: int, kind: str, points: list[list[float]] | None = None) -> None:
        """Stamp a change; trimming marks the oldest kept entry "full" to stay conservative."""
        self.properties["updated"] = at
        self.changes.append(_Change(at, kind, points))
        if len(self.changes) > _HISTORY_CAP:
            del self.changes[: len(self.changes) - _HISTORY_CAP]
            self.changes[0].kind = "full"

    def feature(self, with_geometry: bool = True, *, fresh: bool = True) -> Json:
        """The full GeoJSON feature: a deep copy unless ``fresh`` is False (the server
        serializes it at once, and copying 100k objects would dominate a benchmark)."""
        clone = copy.deepcopy if fresh else _same
        feat: Json = {"type": "Feature", "id": self.id}
        if with_geometry:
            feat["geometry"] = clone(self.geometry)
        feat["properties"] = clone(self.properties)
        return feat

    def delta(self, ts: int) -> Json | None:
        """What the server sends for this object to a client whose cursor is ``ts``.

        The result may share state with the world: serialize it before the next change.
        """
        if self.changes[-1].at <= ts:
            return None
        recent = [c for c in self.changes if c.at > ts]
        nop = {"class": self.cls, "nop": True, "updated": self.properties["updated"]}
        if len(recent) == 1 and recent[0].kind == "geometry":
            return {
                "type": "Feature",
                "id": self.id,
                "geometry": copy.deepcopy(self.geometry),
                "properties": nop,
            }
        if len(recent) == 1 and recent[0].kind == "append" and self.geometry is not None:
            geom = {
                "type": "LineString",
                "coordinates": copy.deepcopy(recent[0].points),
                "incremental": True,
            }
            return {"type": "Feature", "id": self.id, "geometry": geom, "properties": nop}
        return self.feature(with_geometry=not all(c.kind == "props" for c in recent), fresh=False)


def _same(value: Any) -> Any:
    return value


class CalTopoWorld:
    """A team's account and maps with server-side modification times (ms)."""

    def __init__(
        self,
        team_id: str = "TEAM01",
        credential_id: str = "SANDBOXCRED1",
        credential_secret: str = base64.b64encode(b"sandbox-caltopo-secret").decode(),
        *,
        ids_probability: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.team_id = team_id
        self.credential_id = credential_id
        self.credential_secret = credential_secret
        self.ids_probability = ids_probability
        self.faults: list[Fault] = []
        self.request_log: list[LoggedRequest] = []
        self.revoked = False
        self.clock_skew = 0.0
        """Seconds the server's wall clock runs ahead of the real one (to test skew checks)."""
        self._last_ms = 0
        self._id_rng = random.Random(seed)
        self._ids_rng = random.Random(seed + 7919)
        self._account: dict[tuple[str, str], _Obj] = {}
        self._maps: dict[str, dict[tuple[str, str], _Obj]] = {}
        self._churn: dict[str | None, int] = {None: 0}  # scope -> last add/delete (None = acct)

    def wall_clock(self) -> float:
        """The server's wall clock in epoch seconds, skew included."""
        return time.time() + self.clock_skew

    def now(self) -> int:
        """Server clock in epoch ms, strictly increasing so "changed after T" is unambiguous."""
        self._last_ms = max(int(self.wall_clock() * 1000), self._last_ms + 1)
        return self._last_ms

    # ---- account objects -------------------------------------------------------------

    def add_map(self, title: str, *, map_id: str | None = None) -> str:
        """Create an empty CollaborativeMap; ids look like CalTopo's 6-character ones."""
        alphabet = string.ascii_uppercase + string.digits
        while map_id is None or map_id in self._maps:
            map_id = "".join(self._id_rng.choices(alphabet, k=6))
        props = {
            "class": "CollaborativeMap",
            "title": title,
            "accountId": self.team_id,
            "folderId": None,
            "sharing": "SECURE",
        }
        self._add(None, "CollaborativeMap", map_id, None, props)
        self._maps[map_id] = {}
        self._churn[map_id] = self._last_ms  # a re-created id must not look unchanged
        return map_id

    def add_user_folder(self, title: str) -> str:
        """Create an account-level UserFolder (not a map), which clients must tolerate."""
        return self._add(
            None, "UserFolder", self._uuid(), None, {"title": title, "accountId": self.team_id}
        )

    def delete_map(self, map_id: str) -> None:
        """Remove a map: it leaves the account ids and its route answers 404."""
        self._scope(map_id)
        del self._maps[map_id], self._churn[map_id]
        del self._account["CollaborativeMap", map_id]
        self._churn[None] = self.now()

    def unlist_map(self, map_id: str) -> None:
        """Drop a map from the team's account listing while its route keeps answering,
        like a map only shared with (or bookmarked by) the team."""
        del self._account["CollaborativeMap", map_id]
        self._churn[None] = self.now()

    def rename_map(self, map_id: str, title: str) -> None:
        """Change a map's title, a full change of the account object."""
        obj = self._account["CollaborativeMap", map_id]
        obj.properties["title"] = title
        obj.record(self.now(), "full")

    def map_ids(self) -> list[str]:
        """Live map ids, in creation order."""
        return list(self._maps)

    # ---- map objects -----------------------------------------------------------------

    def add_object(
        self,
        map_id: str,
        cls: str,
        geometry: Json | None,
        properties: Json,
        *,
        obj_id: str | None = None,
    ) -> str:
        """Add a map object; ids are uuid-like and deterministic from the world seed."""
        return self._add(map_id, cls, obj_id or self._uuid(), geometry, properties)

    def edit_object(self, map_id: str, cls: str, obj_id: str, properties: Json) -> None:
        """Merge properties: a full change, sent without geometry when that is unchanged."""
        obj = self._scope(map_id)[cls, obj_id]
        changes = {k: v for k, v in properties.items() if k not in ("class", "updated")}
        obj.properties.update(copy.deepcopy(changes))
        obj.record(self.now(), "props")

    def move_object(
        self, map_id: str, cls: str, obj_id: str, geometry: Json, *, geometry_only: bool = True
    ) -> None:
        """Replace the geometry; alone after a cursor it is sent as a title-less nop delta."""
        obj = self._scope(map_id)[cls, obj_id]
        obj.geometry = copy.deepcopy(geometry)
        obj.record(self.now(), "geometry" if geometry_only else "full")

    def append_track_points(
        self, map_id: str, cls: str, obj_id: str, points: list[list[float]]
    ) -> None:
        """Append [lon, lat, alt, t_ms] points; alone after a cursor they arrive incrementally."""
        obj = self._scope(map_id)[cls, obj_id]
        if obj.geometry is None or obj.geometry.get("type") != "LineString":
            raise ValueError(f"{cls}/{obj_id} is not a LineString")
        obj.geometry["coordinates"].extend(copy.deepcopy(points))
        obj.record(self.now(), "append", copy.deepcopy(points))

    def delete_object(self, map_id: str, cls: str, obj_id: str) -> None:
        """Delete: only visible to clients through the ``ids`` map."""
        del self._scope(map_id)[cls, obj_id]
        self._churn[map_id] = self.now()

    def retype_object(self, map_id: str, old_cls: str, obj_id: str, new_cls: str) -> None:
        """Same id, new class (a finished AppTrack becomes a Shape): a delete plus an add."""
        old = self._scope(map_id).pop((old_cls, obj_id))
        self._add(map_id, new_cls, obj_id, old.geometry, old.properties)

    def live_objects(self, map_id: str) -> dict[tuple[str, str], Json]:
        """(class, id) -> full current feature, for tests to compare a mirror with."""
        return {key: obj.feature() for key, obj in self._scope(map_id).items()}

    # ---- faults ----------------------------------------------------------------------

    def add_fault(self, fault: Fault) -> None:
        """Queue a fault; faults fire in insertion order."""
        self.faults.append(fault)

    def revoke(self) -> None:
        """Simulate a deleted credential: every later request gets 401."""
        self.revoked = True

    # ---- internals -------------------------------------------------------------------

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self._id_rng.getrandbits(128), version=4))

    def _scope(self, map_id: str | None) -> dict[tuple[str, str], _Obj]:
        if map_id is None:
            return self._account
        if map_id not in self._maps:
            raise KeyError(f"no such map {map_id}")
        return self._maps[map_id]

    def _add(
        self,
        map_id: str | None,
        cls: str,
        obj_id: str,
        geometry: Json | None,
        properties: Json,
        *,
        at: int | None = None,
    ) -> str:
        scope = self._scope(map_id)
        if (cls, obj_id) in scope:
            raise ValueError(f"{cls}/{obj_id} already exists")
        at = at or self.now()
        props = {"title": "", **copy.deepcopy(properties), "class": cls, "updated": at}
        scope[cls, obj_id] = _Obj(
            cls, obj_id, copy.deepcopy(geometry), props, [_Change(at, "create")]
        )
        self._churn[map_id] = at
        return obj_id

    def _delta(self, map_id: str | None, ts: int) -> tuple[int, list[Json], _Ids | None]:
        """Take T and build the delta in one synchronous step, so nothing slips between."""
        stamp = self.now()
        scope = self._scope(map_id)
        features = [d for obj in scope.values() if (d := obj.delta(ts)) is not None]
        ids: _Ids | None = None
        random_ids = self.ids_probability > 0 and self._ids_rng.random() < self.ids_probability
        if ts == 0 or self._churn[map_id] > ts or random_ids:
            ids = {}
            for cls, obj_id in scope:
                ids.setdefault(cls, []).append(obj_id)
        return stamp, features, ids


# ---- HTTP ----------------------------------------------------------------------------


def _envelope_error(world: CalTopoWorld, code: int, message: str) -> web.Response:
    body = {"status": "error", "code": code, "message": message, "timestamp": world.now()}
    return web.json_response(body, status=code)


def _authorized(world: CalTopoWorld, request: web.Request) -> bool:
    """Check id, expiry (wall clock) and the HMAC signature over the full path."""
    query = request.query
    expires = int(query["expires"]) if query.get("expires", "").isdigit() else 0
    if world.revoked or query.get("id") != world.credential_id:
        return False
    if expires <= int(world.wall_clock() * 1000):
        return False
    want = expected_signature(
        request.method, request.path, expires, query.get("json", ""), world.credential_secret
    )
    return hmac.compare_digest(want.encode(), query.get("signature", "").encode())


def _junk(world: CalTopoWorld) -> Json:
    """accounts/groups/rels as the mobile app sees them; API clients must ignore them."""
    team = {
        "type": "Feature",
        "id": world.team_id,
        "geometry": None,
        "properties": {"class": "Account", "title": "Sandbox Team", "type": "team"},
    }
    svc = {
        "type": "Feature",
        "id": world.credential_id[:6],
        "geometry": None,
        "properties": {"class": "Account", "title": "sandbox-service", "type": "service"},
    }
    rel = {
        "type": "Feature",
        "id": "REL001",
        "geometry": None,
        "properties": {
            "class": "UserAccountMapRel",
            "mapId": "ZZZZZZ",
            "accountId": world.team_id,
            "permission": "READ",
        },
    }
    return {"accounts": [team, svc], "groups": [team], "rels": [rel]}


async def _fire_fault(world: CalTopoWorld, request: web.Request) -> web.StreamResponse | None:
    """Apply the first matching fault; None means continue with normal handling."""
    fault = faulty.pick(world.faults, request.path)
    if fault is None:
        return None
    response = await faulty.respond(
        fault, request, lambda f: _envelope_error(world, f.status, "simulated fault")
    )
    if response is None and fault.kind == "drip":
        match = _ROUTE.match(request.path)
        return await faulty.drip(request, _answer(world, request, match), fault.delay)
    return response


def create_app(world: CalTopoWorld) -> web.Application:
    """The simulator app: routes match the full path, so it works standalone or mounted."""

    async def handle(request: web.Request) -> web.StreamResponse:
        match = _ROUTE.match(request.path)
        since = int(match.group(3)) if match else None
        status = 0
        try:
            resp = await _fire_fault(world, request) or _answer(world, request, match)
            if world.clock_skew:
                resp.headers["Date"] = formatdate(world.wall_clock(), usegmt=True)
            status = faulty.answered_status(request, resp)
            return resp
        finally:
            world.request_log.append(
                LoggedRequest(request.method, request.path, since, status, time.monotonic())
            )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def _answer(world: CalTopoWorld, request: web.Request, match: re.Match[str] | None) -> web.Response:
    if match is None or request.method != "GET":
        return _envelope_error(world, 404, "not found")
    if not _authorized(world, request):
        return _envelope_error(world, 401, "login required")
    scope, key, since = match.group(1), match.group(2), int(match.group(3))
    if scope == "acct" and key != world.team_id:
        return _envelope_error(world, 403, "forbidden")
    if scope == "map" and key not in world.map_ids():
        return _envelope_error(world, 404, "not found")
    stamp, features, ids = world._delta(key if scope == "map" else None, since)
    result: Json = {"timestamp": stamp}
    if scope == "acct":
        result.update({"features": features, **_junk(world)})
    else:
        result["state"] = {"type": "FeatureCollection", "features": features}
    if ids is not None:
        result["ids"] = ids
    envelope = {"status": "ok", "timestamp": stamp, "result": result}
    try:
        body = orjson.dumps(envelope)  # fast for the benchmark's 100k-object maps
    except orjson.JSONEncodeError:  # e.g. nesting deeper than orjson's 255 levels
        body = json.dumps(envelope).encode()
    return web.Response(body=body, content_type="application/json")


# ---- demo data -----------------------------------------------------------------------

_COLORS = ["#FF0000", "#0000FF", "#00AA00", "#FFA500", "#800080"]
_SYMBOLS = ["point", "cp", "clue", "helipad", "camp", "aperture"]


def _jitter(
    rng: random.Random, lon: float, lat: float, n: int, step: float = 0.003
) -> list[list[float]]:
    out = [[lon, lat]]
    for _ in range(n - 1):
        out.append(
            [
                round(out[-1][0] + rng.uniform(-step, step), 6),
                round(out[-1][1] + rng.uniform(-step, step), 6),
            ]
        )
    return out


def _random_object(rng: random.Random, folder: str | None) -> tuple[str, Json, Json]:
    """A realistic Marker or Shape (LineString/Polygon) with CalTopo-style properties."""
    lon, lat = -120.0 + rng.uniform(-0.1, 0.1), 39.0 + rng.uniform(-0.1, 0.1)
    props: Json = {
        "title": f"Item {rng.randint(1, 999)}",
        "description": "",
        "folderId": folder if rng.random() < 0.5 else None,
        "creator": "SANDBX",
    }
    kind = rng.choice(["Marker", "Marker", "Line", "Polygon"])
    if kind == "Marker":
        props.update(
            {
                "marker-color": rng.choice(_COLORS),
                "marker-symbol": rng.choice(_SYMBOLS),
                "marker-size": 1,
                "marker-rotation": None,
            }
        )
        return "Marker", {"type": "Point", "coordinates": [round(lon, 6), round(lat, 6)]}, props
    props.update(
        {"stroke": rng.choice(_COLORS), "stroke-width": 2, "stroke-opacity": 1, "pattern": "solid"}
    )
    ring = _jitter(rng, lon, lat, rng.randint(3, 8))
    if kind == "Line":
        return "Shape", {"type": "LineString", "coordinates": ring}, props
    props.update({"fill": rng.choice(_COLORS), "fill-opacity": 0.1})
    return "Shape", {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}, props


def _track_points(rng: random.Random, start: list[float], n: int, t0: int) -> list[list[float]]:
    pts = _jitter(rng, start[0], start[1], n + 1, 0.0005)[1:]
    return [
        [p[0], p[1], round(1900 + rng.uniform(-20, 20), 1), t0 + 5000 * i]
        for i, p in enumerate(pts, 1)
    ]


def populate(
    world: CalTopoWorld, *, maps: int = 3, objects_per_map: int = 20, seed: int = 0
) -> None:
    """Fill the world with maps of Markers, Shapes, a Folder and an AppTrack."""
    rng = random.Random(seed)
    world.add_user_folder("Operations")
    if maps > 1:
        world.add_user_folder("Training")
    for m in range(maps):
        map_id = world.add_map(f"Sandbox Incident {m + 1}")
        folder = world.add_object(map_id, "Folder", None, {"title": "Assignments", "visible": True})
        t0 = world.now()
        track = _track_points(rng, [-120.0, 39.0], 5, t0 - 60_000)
        world.add_object(
            map_id,
            "AppTrack",
            {"type": "LineString", "coordinates": track},
            {
                "title": f"Searcher {m + 1}",
                "stroke": "#FF00FF",
                "gpstype": "TRACK",
                "folderId": folder,
            },
        )
        for _ in range(max(0, objects_per_map - 2)):
            cls, geom, props = _random_object(rng, folder)
            world.add_object(map_id, cls, geom, props)


def populate_map(world: CalTopoWorld, map_id: str, objects: int, *, seed: int = 0) -> list[str]:
    """Add `objects` random Markers and Shapes to one map at one server time (a bulk import).

    One timestamp for all: stamping each object 1 ms apart would push the simulator's
    strictly increasing clock minutes ahead of the wall clock for a 100k-object map.
    Returns their ids in creation order, so a caller can edit a chosen share of them.
    """
    rng = random.Random(seed)
    at = world.now()
    ids = []
    for _ in range(objects):
        cls, geometry, properties = _random_object(rng, None)
        ids.append(world._add(map_id, cls, world._uuid(), geometry, properties, at=at))
    return ids


async def mutate_forever(
    world: CalTopoWorld, *, every: float = 5.0, seed: int = 0, delete_every: int = 0
) -> None:
    """Keep changing the world at random (objects and occasionally maps), for the demo.

    `delete_every = N` makes every Nth change a deletion of a non-track object.
    """
    rng = random.Random(seed)
    step = 0
    while True:
        await asyncio.sleep(every)
        step += 1
        maps = world.map_ids()
        if not maps or rng.random() < 0.01:
            world.add_map(f"Sandbox Incident {rng.randint(100, 999)}")
            continue
        map_id = rng.choice(maps)
        if len(maps) > 1 and rng.random() < 0.01:
            world.delete_map(map_id)
            continue
        live = world.live_objects(map_id)
        keys = [k for k in live if k[0] != "Folder"]
        tracks = [k for k in keys if k[0] == "AppTrack"]
        op = rng.choice(["add", "edit", "move", "append", "delete", "retype"]) if keys else "add"
        if delete_every and step % delete_every == 0 and len(keys) > len(tracks):
            op = "delete"  # the demo's first minute must show deletions, not just by luck
        if op in ("append", "retype") and not tracks:
            world.add_object(
                map_id,
                "AppTrack",
                {
                    "type": "LineString",
                    "coordinates": _track_points(rng, [-120.0, 39.0], 2, world.now()),
                },
                {"title": "Searcher", "stroke": "#FF00FF"},
            )
        elif op == "append":
            cls, obj_id = rng.choice(tracks)
            last = live[cls, obj_id]["geometry"]["coordinates"][-1]
            world.append_track_points(
                map_id, cls, obj_id, _track_points(rng, last, 3, int(last[3]) + 5000)
            )
        elif op == "retype":
            world.retype_object(map_id, "AppTrack", rng.choice(tracks)[1], "Shape")
        elif op == "add":
            world.add_object(map_id, *_random_object(rng, None))
        elif op == "move" and (markers := [k for k in keys if k[0] == "Marker"]):
            key = rng.choice(markers)
            lon, lat = live[key]["geometry"]["coordinates"][:2]
            point = [round(lon + rng.uniform(-0.002, 0.002), 6), round(lat + 0.001, 6)]
            world.move_object(map_id, *key, {"type": "Point", "coordinates": point})
        elif op == "delete":
            forced = delete_every and step % delete_every == 0
            world.delete_object(
                map_id, *rng.choice([k for k in keys if k not in tracks] if forced else keys)
            )
        else:
            world.edit_object(map_id, *rng.choice(keys), {"description": f"{rng.random():.3f}"})
