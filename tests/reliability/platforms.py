"""One descriptor per platform for the reliability suites: build a world, change it, say
what the mirror must hold, and the `[[sources]]` block that syncs it.

Why: every reliability test (crash points, faults, secrets, concurrency) runs the same
way over every platform; adding Katapult is one more `Platform` in `PLATFORMS`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from syncd.sandbox import caltopo as caltopo_sandbox
from syncd.sandbox import kartorium as kartorium_sandbox
from syncd.sandbox import katapult as katapult_sandbox
from syncd.sandbox.caltopo import Fault
from syncd.sandbox.server import Worlds

# (collection, kind, external_id) -> (name, geometry) of every live object upstream
Expected = dict[tuple[str, str, str], tuple[Any, Any]]
Key = tuple[str, str, str]


def _none_gone(_worlds: Worlds) -> set[Key]:
    return set()


@dataclass(frozen=True)
class Platform:
    """How the reliability suites drive one platform through the sandbox."""

    name: str  # the source name in the generated config, also the test id
    build: Callable[[Worlds], None]  # the first state, synced cleanly before a test starts
    mutate: Callable[[Worlds], None]  # adds, edits, moves and deletions on top of it
    expected: Callable[[Worlds], Expected]
    source_toml: Callable[[Worlds, str, str | None], str]  # (worlds, sandbox url, secret)
    secret: Callable[[Worlds], str]  # the credential the sandbox accepts
    add_fault: Callable[[Worlds, Fault], None]
    routes: tuple[str, ...]  # path fragments a fault may target: listing, then per scope
    revoke: Callable[[Worlds], None]
    one_scope: Callable[[Worlds], str]  # a path fragment that only one scope's requests hold
    # `syncd` processes the crash suite may run at once against this platform's one key:
    # Katapult's 50 ms rule is per key, so parallel clients would only refuse each other.
    parallel: int = 4
    # Objects the mutation removed with their container (a whole job), by key: each must
    # be in the mirror as a tombstone, not live and not lost.
    gone: Callable[[Worlds], set[Key]] = _none_gone


# ---- CalTopo ---------------------------------------------------------------------------


def _caltopo_build(worlds: Worlds) -> None:
    caltopo_sandbox.populate(worlds.caltopo, maps=3, objects_per_map=8, seed=11)


def _caltopo_mutate(worlds: Worlds) -> None:
    world = worlds.caltopo
    first, second, third = world.map_ids()
    objects = sorted(world.live_objects(first))
    marker = next(k for k in objects if k[0] == "Marker")
    world.edit_object(first, *marker, {"title": "Renamed clue", "marker-color": "#123456"})
    track = next(k for k in objects if k[0] == "AppTrack")
    world.append_track_points(first, *track, [[-120.1, 39.1, 0, world.now()]])
    shapes = sorted(k for k in world.live_objects(second) if k[0] in ("Marker", "Shape"))
    world.move_object(second, *shapes[0], {"type": "Point", "coordinates": [-119.5, 38.5]})
    world.delete_object(second, *shapes[1])
    world.add_object(
        third, "Marker", {"type": "Point", "coordinates": [-121.0, 40.0]}, {"title": "New"}
    )
    world.rename_map(third, "Renamed incident")
    extra = world.add_map("Created later")
    world.add_object(extra, "Marker", {"type": "Point", "coordinates": [1.5, 2.5]}, {"title": "x"})


def _caltopo_expected(worlds: Worlds) -> Expected:
    world = worlds.caltopo
    out: Expected = {}
    for map_id in world.map_ids():
        for (cls, obj_id), feature in world.live_objects(map_id).items():
            out[map_id, cls, obj_id] = (feature["properties"].get("title"), feature["geometry"])
    for (cls, obj_id), obj in world._account.items():
        out[f"acct:{world.team_id}", cls, obj_id] = (obj.properties.get("title"), None)
    return out


def _caltopo_toml(worlds: Worlds, url: str, secret: str | None) -> str:
    world = worlds.caltopo
    return f"""
[[sources]]
name = "sar"
type = "caltopo"
base_url = "{url}{caltopo_sandbox.PREFIX}"
team_id = "{world.team_id}"
credential_id = "{world.credential_id}"
credential_secret = "{secret or world.credential_secret}"
retry_backoff = "1ms"
max_retries = 2
timeout = 2
"""


# ---- Kartorium -------------------------------------------------------------------------


def _kartorium_build(worlds: Worlds) -> None:
    kartorium_sandbox.populate(worlds.kartorium, projects=2, features_per_scene=6, seed=5)


def _kartorium_mutate(worlds: Worlds) -> None:
    world = worlds.kartorium
    features = sorted(world.features)
    world.edit_feature(features[0], name="Renamed point")
    world.set_property(features[1], "coordinateString", json.dumps([[1.0, 2.0], [3.0, 4.0]]))
    world.delete_feature(features[2])
    scene = world.features[features[3]]["sceneID"]
    world.add_feature(scene, "marker", "Added later", position=(-105.0, 40.0, 1.0))
    pid = world.add_project("Created later")
    sid = world.add_scene(pid, "Later map", "Map")
    world.add_feature(sid, "marker", "Late marker", position=(5.0, 6.0, 0.0))


def _kartorium_expected(worlds: Worlds) -> Expected:
    world = worlds.kartorium
    out: Expected = {}
    for pid, row in world.projects.items():
        out[str(pid), "project", str(pid)] = (row["title"], None)
    for sid, row in world.scenes.items():
        out[str(row["projectID"]), "scene", str(sid)] = (row["name"], None)
    for fid, row in world.features.items():
        out[str(row["projectID"]), "feature", str(fid)] = (
            row["name"],
            _kartorium_geometry(world, fid),
        )
    return out


def _kartorium_geometry(world: kartorium_sandbox.KartoriumWorld, fid: int) -> Any:
    row = world.features[fid]
    if row["type"] == "marker":
        return {"type": "Point", "coordinates": list(row["position"])}
    text = next(
        p["value"]
        for p in world.properties.values()
        if p["featureID"] == fid and p["key"] == "coordinateString"
    )
    points = json.loads(text)
    if row["type"] == "line":
        return {"type": "LineString", "coordinates": points}
    ring = points if points[0] == points[-1] else [*points, points[0]]
    return {"type": "Polygon", "coordinates": [ring]}


def _kartorium_toml(worlds: Worlds, url: str, secret: str | None) -> str:
    return f"""
[[sources]]
name = "twin"
type = "kartorium"
base_url = "{url}{kartorium_sandbox.API}"
api_key = "{secret or next(iter(worlds.kartorium.keys))}"
retry_backoff = "1ms"
max_retries = 2
timeout = 2
"""


def _kartorium_revoke(worlds: Worlds) -> None:
    worlds.kartorium.keys.clear()


# ---- Katapult --------------------------------------------------------------------------


SMALL_JOB = "Short survey"


def _katapult_build(worlds: Worlds) -> None:
    world = worlds.katapult
    katapult_sandbox.populate(world, jobs=2, poles=4, seed=7)
    # The job the mutation deletes whole: one of each kind, 7 rows. Kept under the
    # mass-delete guard's `mass_delete_min_rows` (10) on purpose: a job that answers 404
    # is all of its own scope, so the guard would hold a larger one (see DeleteGuard),
    # and this suite checks the job-gone cascade, not the guard.
    small = world.add_job(SMALL_JOB, metadata={"city": "Buffalo"})
    a = world.add_node(small, 42.93, -78.86, {"node_type": "pole", "scid": "s1"})
    b = world.add_node(small, 42.931, -78.861, {"node_type": "pole", "scid": "s2"})
    span = world.add_connection(small, a, b, {"connection_type": "aerial cable"})
    world.add_section(small, span, 42.9305, -78.8605, {"section_type": "midpoint"})
    world.add_photo(small, a)
    world.add_trace(small, "equipment", {"company": "Sandbox Power"})


def _katapult_mutate(worlds: Worlds) -> None:
    world = worlds.katapult
    by_name = {job.data["name"]: job_id for job_id, job in world.jobs.items()}
    first, second = by_name["Sandbox Pole Survey 1"], by_name["Sandbox Pole Survey 2"]
    world.delete_job(by_name[SMALL_JOB])  # gone from the job list, and 404 on its status
    nodes = sorted(world.jobs[first].nodes)
    world.move_node(first, nodes[0], 42.95, -78.8)
    world.set_node_attributes(first, nodes[1], {"node_type": "pole", "note": "re-tagged"})
    world.delete_node(first, nodes[-1])  # and, as Katapult does, its connection
    world.add_node(second, 42.97, -78.85, {"node_type": "pole", "scid": "new"})
    world.update_job(second, name="Renamed survey")
    extra = world.add_job("Created later", metadata={"city": "Buffalo"})
    world.add_node(extra, 42.99, -78.9, {"node_type": "pole"})


def _katapult_expected(worlds: Worlds) -> Expected:
    out: Expected = {}
    for job_id, job in worlds.katapult.jobs.items():
        out.update(_katapult_job(job_id, job))
    return out


def _katapult_gone(worlds: Worlds) -> set[Key]:
    """Everything of each deleted job: the job-gone cascade must tombstone it all."""
    world = worlds.katapult
    return {key for job_id, job in world.deleted_jobs.items() for key in _katapult_job(job_id, job)}


def _katapult_job(job_id: str, job: katapult_sandbox.KatapultJob) -> Expected:
    out: Expected = {(job_id, "job", job_id): (job.data["name"], None)}
    where = {n: [raw["longitude"], raw["latitude"]] for n, raw in job.nodes.items()}
    for node_id in job.nodes:
        out[job_id, "node", node_id] = (None, {"type": "Point", "coordinates": where[node_id]})
    for conn_id, conn in job.connections.items():
        line = [where[conn["node_id_1"]], where[conn["node_id_2"]]]
        out[job_id, "connection", conn_id] = (None, {"type": "LineString", "coordinates": line})
        for section_id, section in conn["sections"].items():
            at = [section["longitude"], section["latitude"]]
            out[job_id, "section", section_id] = (None, {"type": "Point", "coordinates": at})
    for photo_id in job.photos:
        out[job_id, "photo", photo_id] = (None, None)
    for trace_id in job.traces:
        out[job_id, "trace", trace_id] = (None, None)
    return out


def _katapult_toml(worlds: Worlds, url: str, secret: str | None) -> str:
    # The 50 ms pacing stays real. The margin is the one tests/conftest.py explains: this
    # sandbox shares the client's event loop, so a request can wait to be stamped.
    return f"""
[[sources]]
name = "poles"
type = "katapult"
base_url = "{url}{katapult_sandbox.API}"
api_key = "{secret or worlds.katapult.api_key}"
pacing_margin_ms = 5
retry_backoff = "1ms"
max_retries = 2
timeout = 2
"""


def _katapult_revoke(worlds: Worlds) -> None:
    worlds.katapult.api_key = "revoked-" + worlds.katapult.api_key


CALTOPO = Platform(
    name="sar",
    build=_caltopo_build,
    mutate=_caltopo_mutate,
    expected=_caltopo_expected,
    source_toml=_caltopo_toml,
    secret=lambda w: w.caltopo.credential_secret,
    add_fault=lambda w, f: w.caltopo.add_fault(f),
    routes=("/acct/", "/map/"),
    revoke=lambda w: w.caltopo.revoke(),
    one_scope=lambda w: f"/map/{w.caltopo.map_ids()[0]}/",
)

KARTORIUM = Platform(
    name="twin",
    build=_kartorium_build,
    mutate=_kartorium_mutate,
    expected=_kartorium_expected,
    source_toml=_kartorium_toml,
    secret=lambda w: next(iter(w.kartorium.keys)),
    add_fault=lambda w, f: w.kartorium.add_fault(f),
    routes=("/client/projects", "/features"),
    revoke=_kartorium_revoke,
    one_scope=lambda w: f"/projects/{min(w.kartorium.projects)}/scenes",
)

KATAPULT = Platform(
    name="poles",
    build=_katapult_build,
    mutate=_katapult_mutate,
    expected=_katapult_expected,
    source_toml=_katapult_toml,
    secret=lambda w: w.katapult.api_key,
    add_fault=lambda w, f: w.katapult.faults.append(f),
    routes=(f"{katapult_sandbox.API}/jobs", "/jobs/"),
    revoke=_katapult_revoke,
    one_scope=lambda w: f"/jobs/{min(w.katapult.jobs)}",
    parallel=1,
    gone=_katapult_gone,
)

PLATFORMS = (CALTOPO, KARTORIUM, KATAPULT)
