"""A local Katapult Pro API v3 simulator that enforces Katapult's own rate rules.

Why: the Katapult source must be proven against what makes a correct, polite client
(the 50 ms rule per key, the token bucket, `meta` on every route answer, entity
attribute lists, `last_updated` filters, archived jobs) without katapultpro.com. Its
responses are checked against Katapult's published OpenAPI document
(tests/unit/test_sandbox_katapult_spec.py) so it cannot drift into a world of its own.
Arrival times are stamped before anything else runs, so the request log is the
server's view of the pacing.
"""

from __future__ import annotations

import copy
import itertools
import random
import string
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from syncd.sandbox import faulty
from syncd.sandbox.caltopo import Fault

PREFIX = "/katapult"
API = f"{PREFIX}/api/v3"
API_KEY = "sandbox-katapult-key-0001"

Json = dict[str, Any]
_JOB_PATHS = (
    "name",
    "job_creator",
    "job_owner",
    "project_folder",
    "project_id",
    "status",
    "done",
    "map_styles",
    "metadata",
    "sharing",
)


@dataclass(frozen=True)
class LoggedRequest:
    """One request as the server saw it: arrival (monotonic s), route, answer."""

    method: str
    path: str
    query: dict[str, str]
    status: int
    at: float


@dataclass
class KatapultJob:
    """A job and its contents, in Katapult's own shapes."""

    id: str
    data: Json
    last_updated: str
    nodes: dict[str, Json] = field(default_factory=dict)
    connections: dict[str, Json] = field(default_factory=dict)
    photos: dict[str, Json] = field(default_factory=dict)
    traces: dict[str, Json] = field(default_factory=dict)
    stamped: bool = True
    """Whether the job list shows `last_updated` (the spec: "when available")."""


def iso(ms: int) -> str:
    """Epoch ms as the ISO 8601 UTC text Katapult uses for `last_updated`."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def attribute_list(values: Json, rng: random.Random) -> Json:
    """A flat {name: value | [values]} as an entity attribute list with instance ids."""
    out: Json = {}
    for name, value in values.items():
        items = value if isinstance(value, list) else [value]
        out[name] = {f"-I{_token(rng, 18)}{i}": item for i, item in enumerate(items)}
    return out


def _token(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(string.ascii_letters + string.digits, k=n))


class KatapultWorld:
    """Jobs, one API key, and that key's limits (allotment, refill period, pacing)."""

    def __init__(
        self,
        *,
        api_key: str = API_KEY,
        allotment: int = 10_000,
        refill_period: float = 60.0,
        min_interval: float = 0.05,
        seed: int = 0,
    ) -> None:
        self.api_key = api_key
        self.allotment = allotment
        self.refill_period = refill_period
        self.min_interval = min_interval
        self.jobs: dict[str, KatapultJob] = {}
        self.deleted_jobs: dict[str, KatapultJob] = {}
        """Jobs removed by `delete_job`, as they were: what a mirror must keep as tombstones."""
        self.faults: list[Fault] = []
        self.request_log: list[LoggedRequest] = []
        self.tokens = allotment
        self.last_refill_ms = int(time.time() * 1000)
        self._last_arrival: float | None = None
        self._last_ms = 0
        self._rng = random.Random(seed)

    # ---- clock and ids ---------------------------------------------------------------

    def now_ms(self) -> int:
        """Server clock, strictly increasing so "updated after T" is unambiguous."""
        self._last_ms = max(int(time.time() * 1000), self._last_ms + 1)
        return self._last_ms

    def new_id(self) -> str:
        """Ids like Katapult's push ids (`-O...`, 20 characters)."""
        return "-O" + _token(self._rng, 18)

    # ---- jobs ------------------------------------------------------------------------

    def add_job(self, name: str, *, metadata: Json | None = None, status: str = "active") -> str:
        """Create a job."""
        job_id = self.new_id()
        data = {
            "name": name,
            "status": status,
            "metadata": dict(metadata or {}),
            "job_creator": "sandbox_model",
            "project_id": "-OProject0000000000",
            "done": False,
            "map_styles": "default",
            "sharing": {"-OSandboxCompany00000": "write"},
        }
        self.jobs[job_id] = KatapultJob(job_id, data, iso(self.now_ms()))
        return job_id

    def update_job(
        self, job_id: str, *, name: str | None = None, metadata: Json | None = None
    ) -> None:
        """Rename a job or merge metadata (a `null` value removes the key)."""
        job = self.jobs[job_id]
        if name is not None:
            job.data["name"] = name
        for key, value in (metadata or {}).items():
            if value is None:
                job.data["metadata"].pop(key, None)
            else:
                job.data["metadata"][key] = value
        self.touch(job_id)

    def set_status(self, job_id: str, status: str) -> None:
        """Archive (`archived`) or restore (`active`) a job."""
        self.jobs[job_id].data["status"] = status
        self.touch(job_id)

    def delete_job(self, job_id: str) -> None:
        """Remove a job: it leaves the job list and its routes answer 404 `not_found`."""
        self.deleted_jobs[job_id] = self.jobs.pop(job_id)

    def touch(self, job_id: str) -> str:
        """Stamp the job's `last_updated` (every change inside a job does)."""
        stamp = iso(self.now_ms())
        self.jobs[job_id].last_updated = stamp
        return stamp

    # ---- entities --------------------------------------------------------------------

    def add_node(
        self, job_id: str, latitude: float, longitude: float, attributes: Json | None = None
    ) -> str:
        """Create a node; `attributes` is flat ({name: value or [values]})."""
        node_id = self.new_id()
        self.jobs[job_id].nodes[node_id] = {
            "latitude": latitude,
            "longitude": longitude,
            "attributes": attribute_list(attributes or {}, self._rng),
            "_created": {"method": "api", "timestamp": self.now_ms()},
            "last_updated": self.touch(job_id),
        }
        return node_id

    def move_node(self, job_id: str, node_id: str, latitude: float, longitude: float) -> None:
        """Change a node's position."""
        node = self.jobs[job_id].nodes[node_id]
        node.update(latitude=latitude, longitude=longitude, last_updated=self.touch(job_id))

    def set_node_attributes(self, job_id: str, node_id: str, attributes: Json) -> None:
        """Replace a node's attributes (flat form)."""
        node = self.jobs[job_id].nodes[node_id]
        node["attributes"] = attribute_list(attributes, self._rng)
        node["last_updated"] = self.touch(job_id)

    def delete_node(self, job_id: str, node_id: str, *, cascade: bool = True) -> None:
        """Delete a node and (as Katapult does) the connections attached to it."""
        job = self.jobs[job_id]
        del job.nodes[node_id]
        if cascade:
            for conn_id in [c for c, conn in job.connections.items() if node_id in _ends(conn)]:
                del job.connections[conn_id]
        self.touch(job_id)

    def add_connection(
        self,
        job_id: str,
        node_id_1: str,
        node_id_2: str,
        attributes: Json | None = None,
        *,
        breakpoints: list[list[float]] | None = None,
    ) -> str:
        """Create a connection (no check that the nodes exist, like a raw write)."""
        conn_id = self.new_id()
        conn: Json = {
            "node_id_1": node_id_1,
            "node_id_2": node_id_2,
            "attributes": attribute_list(attributes or {}, self._rng),
            "sections": {},
        }
        if breakpoints:
            conn["breakpoints"] = breakpoints
        self.jobs[job_id].connections[conn_id] = conn
        self.touch(job_id)
        return conn_id

    def delete_connection(self, job_id: str, conn_id: str) -> None:
        """Delete a connection and its sections."""
        del self.jobs[job_id].connections[conn_id]
        self.touch(job_id)

    def add_section(
        self,
        job_id: str,
        conn_id: str,
        latitude: float,
        longitude: float,
        attributes: Json | None = None,
    ) -> str:
        """Create a midspan section on a connection."""
        section_id = self.new_id()
        self.jobs[job_id].connections[conn_id]["sections"][section_id] = {
            "latitude": latitude,
            "longitude": longitude,
            "attributes": attribute_list(attributes or {}, self._rng),
        }
        self.touch(job_id)
        return section_id

    def add_photo(self, job_id: str, node_id: str | None = None) -> str:
        """Create a photo record, associated to a node when given."""
        photo_id = self.new_id()
        photo: Json = {"filename": f"{photo_id}.jpg", "uploaded": self.now_ms()}
        if node_id is not None:
            photo["associations"] = {node_id: True}
            self.jobs[job_id].nodes[node_id].setdefault("photos", {})[photo_id] = {
                "association": True
            }
        self.jobs[job_id].photos[photo_id] = photo
        self.touch(job_id)
        return photo_id

    def add_trace(self, job_id: str, trace_type: str, attributes: Json | None = None) -> str:
        """Create a trace; trace attributes are flat on the object."""
        trace_id = self.new_id()
        self.jobs[job_id].traces[trace_id] = {
            "_trace_type": trace_type,
            "items": {},
            **(attributes or {}),
        }
        self.touch(job_id)
        return trace_id

    def delete_trace(self, job_id: str, trace_id: str) -> None:
        """Delete a trace."""
        del self.jobs[job_id].traces[trace_id]
        self.touch(job_id)

    # ---- limits ----------------------------------------------------------------------

    def _meta(self) -> Json:
        return {"token_count": self.tokens, "last_refill_time": self.last_refill_ms}

    def _refill(self, now_ms: int) -> None:
        if now_ms >= self.last_refill_ms + self.refill_period * 1000:
            self.tokens = self.allotment
            self.last_refill_ms = now_ms


def _ends(conn: Json) -> tuple[Any, Any]:
    return conn.get("node_id_1"), conn.get("node_id_2")


# ---- HTTP ----------------------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _cost(method: str, path: str) -> int:
    if path.rstrip("/") == API:
        return 0  # the welcome route is free (x-token-cost: 0)
    return 1 if method == "GET" else 10


def create_app(world: KatapultWorld) -> web.Application:
    """The simulator app: routes match the full path, so it works standalone or mounted."""

    async def handle(request: web.Request) -> web.StreamResponse:
        arrival = time.monotonic()
        status = 0
        try:
            resp: web.StreamResponse | None = _gate(world, request, arrival)
            if resp is None:
                fault = faulty.pick(world.faults, request.path)
                resp = await faulty.respond(fault, request, error) if fault else None
                if resp is None:
                    answer = _answer(world, request)
                    resp = answer
                    if fault is not None and fault.kind == "drip":
                        resp = await faulty.drip(request, answer, fault.delay)
            status = faulty.answered_status(request, resp)
            return resp
        finally:
            query = {k: v for k, v in request.query.items() if k != "api_key"}
            world.request_log.append(
                LoggedRequest(request.method, request.path, query, status, arrival)
            )

    def error(fault: Fault) -> web.Response:
        return _error(world, fault.status, "simulated fault", "internal_error")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def _gate(world: KatapultWorld, request: web.Request, arrival: float) -> web.Response | None:
    """Katapult's own refusals, in the order it applies them; None lets the request in.

    Middleware rules first: they answer `{"error": ...}` without `meta`. Injected faults
    come after the gate, so a faulty answer still counts for the 50 ms rule.
    """
    key = request.query.get("api_key")
    if not key:
        return web.json_response({"error": "MISSING API KEY"}, status=400)
    if key != world.api_key:
        return web.json_response({"error": "INVALID API KEY"}, status=401)
    previous, world._last_arrival = world._last_arrival, arrival
    if previous is not None and arrival - previous < world.min_interval:
        return web.json_response({"error": "GENERAL RATE LIMIT EXCEEDED"}, status=429)
    now_ms = world.now_ms()
    world._refill(now_ms)
    cost = _cost(request.method, request.path)
    if world.tokens < cost:
        return _error(world, 429, "Token bucket is empty", "token_rate_limit_exceeded")
    return None


def _answer(world: KatapultWorld, request: web.Request) -> web.Response:
    """The route's answer; only successful calls are charged."""
    cost = _cost(request.method, request.path)
    try:
        data = _route(world, request)
    except _Refused as refused:
        return _error(world, refused.status, refused.message, refused.kind)
    world.tokens -= cost  # only successful calls are charged
    if data is _WELCOME:
        return web.json_response(
            {"status": "success", "message": "Welcome to the Katapult Pro API V3"}
        )
    return web.json_response({"status": "success", "data": data, "meta": world._meta()})


def _error(world: KatapultWorld, status: int, message: str, kind: str) -> web.Response:
    body = {"status": "error", "message": message, "type": kind, "meta": world._meta()}
    return web.json_response(body, status=status)


_WELCOME: Any = object()


def _route(world: KatapultWorld, request: web.Request) -> Any:  # noqa: PLR0911 - a route table
    path = request.path.rstrip("/")
    if not path.startswith(API):
        raise _Refused(404, "Route not found", "not_found")
    parts = path[len(API) :].strip("/").split("/") if path != API else []
    if request.method != "GET":
        raise _Refused(404, "Route not found", "not_found")
    if not parts:
        return _WELCOME
    if parts[0] != "jobs":
        raise _Refused(404, "Route not found", "not_found")
    if len(parts) == 1:
        return _list_jobs(world, request.query)
    job = world.jobs.get(parts[1])
    if job is None:
        raise _Refused(404, f"Job {parts[1]} not found", "not_found")
    rest = parts[2:]
    if not rest:
        return _job_data(job, request.query.get("paths"))
    if rest == ["status"]:
        return {"id": job.id, "status": job.data["status"]}
    if rest == ["nodes"]:
        return _filtered(job.nodes, request.query)
    if rest[0] in ("nodes", "connections", "photos", "traces") and len(rest) == 2:
        items: dict[str, Json] = getattr(job, rest[0])
        if rest[1] not in items:
            raise _Refused(404, f"{rest[0][:-1]} {rest[1]} not found", "not_found")
        return {"id": rest[1], **copy.deepcopy(items[rest[1]])}
    if rest in (["connections"], ["photos"], ["traces"]):
        items = getattr(job, rest[0])
        return [{"id": key, **copy.deepcopy(value)} for key, value in items.items()]
    if len(rest) == 3 and rest[0] == "connections" and rest[2] == "sections":
        conn = job.connections.get(rest[1])
        if conn is None:
            raise _Refused(404, f"connection {rest[1]} not found", "not_found")
        return [{"id": key, **copy.deepcopy(s)} for key, s in conn["sections"].items()]
    raise _Refused(404, "Route not found", "not_found")


def _job_data(job: KatapultJob, paths: str | None) -> Json:
    data: Json = {"id": job.id}
    wanted = [p.strip() for p in paths.split(",")] if paths else []
    for path in wanted:
        if path not in _JOB_PATHS:
            raise _Refused(400, f"Invalid path: {path}", "invalid_request")
        if path in job.data:
            data[path] = copy.deepcopy(job.data[path])
    return data


def _list_jobs(world: KatapultWorld, query: Any) -> list[Json]:
    include_archived = query.get("includeArchived") == "true"
    filters = _metadata_filter(query.get("metadataFilter"))
    entries = {}
    for job in world.jobs.values():
        if job.data["status"] == "archived" and not include_archived:
            continue
        metadata = job.data["metadata"]
        if any(str(metadata.get(k)) != v for k, v in filters):
            continue
        entries[job.id] = {"status": job.data["status"], "metadata": copy.deepcopy(metadata)}
        if job.stamped:
            entries[job.id]["last_updated"] = job.last_updated
    return _filtered(entries, query)


def _metadata_filter(text: str | None) -> list[tuple[str, str]]:
    if not text:
        return []
    pairs = []
    for part in text.split(","):
        name, sep, value = part.partition(":")
        if not sep or not name:
            raise _Refused(400, f"Invalid metadataFilter: {part}", "invalid_request")
        pairs.append((name, value))
    return pairs


def _filtered(items: dict[str, Json], query: Any) -> list[Json]:
    """`last_updated` (strictly after) and `limit`, newest first, as the spec describes."""
    after = query.get("last_updated")
    limit = query.get("limit")
    if after is not None:
        try:
            cutoff = datetime.fromisoformat(after.replace("Z", "+00:00"))
        except ValueError:
            raise _Refused(400, "Invalid last_updated", "invalid_request") from None
        if cutoff.tzinfo is None:
            cutoff = cutoff.replace(tzinfo=UTC)
    if limit is not None and (not limit.isdigit() or int(limit) < 1):
        raise _Refused(400, "Invalid limit", "invalid_request")
    rows = [{"id": key, **copy.deepcopy(value)} for key, value in items.items()]
    rows.sort(key=lambda r: r.get("last_updated", ""), reverse=True)
    if after is not None:
        rows = [
            r
            for r in rows
            if "last_updated" in r
            and datetime.fromisoformat(r["last_updated"].replace("Z", "+00:00")) > cutoff
        ]
    return rows[: int(limit)] if limit is not None else rows


# ---- demo data -----------------------------------------------------------------------


def populate(world: KatapultWorld, *, jobs: int = 3, poles: int = 6, seed: int = 0) -> list[str]:
    """Jobs of poles in a line, spans between them with a midspan section, photos, a trace."""
    rng = random.Random(seed)
    created = []
    for j in range(jobs):
        job_id = world.add_job(
            f"Sandbox Pole Survey {j + 1}", metadata={"city": "Buffalo", "phase": str(j % 2)}
        )
        lat, lon = 42.88 + 0.01 * j, -78.87
        nodes = []
        for p in range(poles):
            lat += rng.uniform(0.0005, 0.001)
            lon += rng.uniform(-0.0005, 0.0005)
            nodes.append(
                world.add_node(
                    job_id,
                    round(lat, 7),
                    round(lon, 7),
                    {"node_type": "pole", "scid": f"{p + 1:03d}", "pole_tag": f"T{j}{p:03d}"},
                )
            )
        for a, b in itertools.pairwise(nodes):
            conn = world.add_connection(job_id, a, b, {"connection_type": "aerial cable"})
            na, nb = world.jobs[job_id].nodes[a], world.jobs[job_id].nodes[b]
            world.add_section(
                job_id,
                conn,
                round((na["latitude"] + nb["latitude"]) / 2, 7),
                round((na["longitude"] + nb["longitude"]) / 2, 7),
                {"section_type": "midpoint"},
            )
        world.add_photo(job_id, nodes[0])
        world.add_photo(job_id)
        world.add_trace(job_id, "equipment", {"company": "Sandbox Power", "cable_type": "primary"})
        created.append(job_id)
    return created


async def mutate_forever(world: KatapultWorld, *, every: float = 5.0, seed: int = 0) -> None:
    """Keep moving, re-tagging, adding and deleting poles, for the demo."""
    import asyncio

    rng = random.Random(seed)
    while True:
        await asyncio.sleep(every)
        if not world.jobs:
            continue
        job_id = rng.choice(sorted(world.jobs))
        nodes = sorted(world.jobs[job_id].nodes)
        op = rng.choice(["move", "tag", "add", "delete"]) if len(nodes) > 2 else "add"
        if op == "add" or not nodes:
            world.add_node(job_id, 42.9 + rng.uniform(0, 0.05), -78.87, {"node_type": "pole"})
        elif op == "move":
            node_id = rng.choice(nodes)
            node = world.jobs[job_id].nodes[node_id]
            world.move_node(job_id, node_id, node["latitude"] + 0.0001, node["longitude"])
        elif op == "tag":
            world.set_node_attributes(
                job_id, rng.choice(nodes), {"node_type": "pole", "note": f"{rng.random():.3f}"}
            )
        else:
            world.delete_node(job_id, rng.choice(nodes))
