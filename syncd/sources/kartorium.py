"""Kartorium Client API: full listings of projects, scenes, features and feature properties.

Kartorium has no change cursor and documents no timestamps (FACTS.md), so every pass
reads full listings. Scopes: `projects` (the project listing) and `project:<id>` (one
project's scenes and features). A listing proves deletions only when it completed
without error in this pass; a project missing from a complete project listing is
tombstoned with everything in it.

Property fetches cost one request per feature. The `project:<id>` cursor holds a
compact digest of every feature row as last listed (see `ProjectState`); with
`properties_recheck_every = N > 1` a feature whose listed row is unchanged has its
properties re-read only once every N passes (a rotating slice), because the feature
listing cannot show a property-only edit (no timestamps, properties live in their own
table). The default N = 1 re-reads every feature's properties every pass: exact.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import structlog
from pydantic import Field, PositiveInt, SecretStr, field_validator

from syncd.errors import AuthError, NotFoundError, ProtocolError, RecordError
from syncd.http import BearerAuth, HttpClient
from syncd.mirror.content import canonical_json
from syncd.records import JSON, Listing, Record, ScopeFailed, Snapshot
from syncd.settings import BaseUrl, SourceSettings
from syncd.sources.fanout import fan_out
from syncd.sources.kartorium_api import explain_auth, unwrap_list
from syncd.sources.kartorium_geometry import COORDINATE_KEY, InvalidGeometry, feature_geometry

log = structlog.get_logger(__name__)
_T = TypeVar("_T")

PROJECTS_SCOPE = "projects"
PROJECT_PREFIX = "project:"
_STATE_VERSION = 1


class KartoriumSettings(SourceSettings):
    """`type = "kartorium"`: an organization's projects through a Client API key."""

    file_secrets: ClassVar[frozenset[str]] = frozenset({"api_key"})

    type: Literal["kartorium"]
    base_url: BaseUrl = "https://kartorium.app/api/v1"
    api_key: SecretStr
    """Sent only as `Authorization: Bearer ...`; never in a URL."""
    projects: list[PositiveInt] | None = None
    """Only these project ids (default: every project the key can see)."""
    properties_recheck_every: int = Field(default=1, ge=1, le=1000)
    """Re-read properties of features whose listed row is unchanged once every N passes."""

    @field_validator("api_key")
    @classmethod
    def _not_blank(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        return value


def auth_for(settings: KartoriumSettings) -> BearerAuth:
    return BearerAuth(settings.api_key.get_secret_value())


@dataclass
class ProjectState:
    """The `project:<id>` cursor: which pass this is and a digest per listed feature row.

    A digest is 64 bits of BLAKE2b over the canonical JSON of the feature row exactly as
    listed; it says "the mirror holds this feature as built from this row".
    """

    passes: int = 0
    rows: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, cursor: str | None) -> ProjectState:
        """An unreadable or older-format cursor costs one full read, never a wrong skip."""
        try:
            data = json.loads(cursor or "")
        except ValueError:
            return cls()
        if not isinstance(data, dict) or data.get("v") != _STATE_VERSION:
            return cls()
        rows, passes = data.get("rows"), data.get("passes")
        if not isinstance(rows, dict) or not isinstance(passes, int):
            return cls()
        return cls(passes, {str(k): str(v) for k, v in rows.items()})

    def dump(self) -> str:
        return json.dumps(
            {"v": _STATE_VERSION, "passes": self.passes, "rows": self.rows},
            separators=(",", ":"),
            sort_keys=True,
        )


def row_digest(row: JSON) -> str:
    """A short, deterministic digest of a listed row (for the property cache).

    NaN/Infinity are allowed here: the digest only has to be stable, and refusing
    them failed the whole project for one bad feature (issue 6); the feature itself
    is still skipped as unrepresentable when its record is built.
    """
    text = json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


@dataclass
class PassStats:
    """Counts for the `kartorium.pass` event: what the property cache saved."""

    projects: int = 0
    features: int = 0
    properties_fetched: int = 0
    properties_reused: int = 0


class KartoriumSource:
    """Lists projects, then every project's scenes, features and properties concurrently."""

    def __init__(self, settings: KartoriumSettings, http: HttpClient) -> None:
        self.name = settings.name
        self.settings = settings
        self.http = http
        self._slots = asyncio.Semaphore(settings.concurrency)
        self.stats = PassStats()

    async def check(self) -> str:
        """The cheapest authenticated call: the project listing."""
        projects = await self._list_projects()
        return f"{len(projects)} projects visible"

    async def snapshots(
        self, cursors: Mapping[str, str], *, full: bool = False
    ) -> AsyncIterator[Snapshot | ScopeFailed]:
        # Failing to list projects fails the source: nothing is known, nothing is deleted.
        listed = await self._list_projects()
        snapshot, wanted = self._projects_snapshot(listed, cursors)
        yield snapshot
        self.stats = PassStats(projects=len(wanted))
        async for item in self._project_snapshots(sorted(wanted), cursors, full):
            yield item
        log.info("kartorium.pass", source=self.name, **self.stats.__dict__)

    def _projects_snapshot(
        self, listed: list[Any], cursors: Mapping[str, str]
    ) -> tuple[Snapshot, set[str]]:
        only = {str(p) for p in self.settings.projects} if self.settings.projects else None
        records: list[Record] = []
        for row in listed:
            record = _identified(_project_record, row)
            if only is None or record.external_id in only:
                records.append(record)
        ids = {r.external_id for r in records}
        known = {s.removeprefix(PROJECT_PREFIX) for s in cursors if s.startswith(PROJECT_PREFIX)}
        if only is not None:
            known &= only  # narrowing the filter stops syncing a project; it deletes nothing
            for missing in sorted(only - ids):
                log.warning("kartorium.project_not_listed", source=self.name, project=missing)
        gone = known - ids
        for project in sorted(gone):
            log.info("kartorium.project_gone", source=self.name, project=project)
        listings = [
            Listing(
                None if only is None else frozenset(only),
                frozenset(r.key for r in records),
                frozenset({"project"}),
            ),
            *(Listing(frozenset({p}), frozenset(), cascade=True) for p in sorted(gone)),
        ]
        return (
            Snapshot(
                scope=PROJECTS_SCOPE,
                records=records,
                listings=tuple(listings),
                drop_cursors=frozenset(PROJECT_PREFIX + p for p in gone),
                new_scopes={
                    PROJECT_PREFIX + p: "" for p in ids if PROJECT_PREFIX + p not in cursors
                },
            ),
            ids,
        )

    async def _project_snapshots(
        self, projects: list[str], cursors: Mapping[str, str], full: bool
    ) -> AsyncIterator[Snapshot | ScopeFailed]:
        async def fetch(project: str) -> Snapshot | None:
            scope = PROJECT_PREFIX + project
            state = ProjectState() if full else ProjectState.parse(cursors.get(scope))
            return await self._project_snapshot(project, scope, state)

        # Requests are bounded by the source-wide semaphore inside each fetch; a bad
        # key or a missing scope fails the whole source.
        try:
            async for item in fan_out(
                projects, fetch, scope_of=lambda p: PROJECT_PREFIX + p, fatal=(AuthError,)
            ):
                yield item
        except AuthError as err:
            raise explain_auth(err) from None

    async def _project_snapshot(
        self, project: str, scope: str, state: ProjectState
    ) -> Snapshot | None:
        try:
            scene_rows = await self._list(f"/client/projects/{project}/scenes")
            feature_rows = await self._list(f"/client/projects/{project}/features")
        except NotFoundError:
            # Deleted between the project listing and now: the next pass's project
            # listing proves it gone; until then nothing of it is touched.
            log.info("kartorium.project_vanished", source=self.name, project=project)
            return None
        scenes = self._scenes(scene_rows, project)
        rows = self._feature_rows(feature_rows, project)
        self.stats.features += len(rows)
        passes = state.passes + 1
        every = self.settings.properties_recheck_every
        fetch = [
            fid
            for fid, row in rows.items()
            if state.rows.get(fid) != row_digest(row) or (int(fid) + passes) % every == 0
        ]
        fetched = await self._all_properties(fetch)
        new_rows = {fid: digest for fid, digest in state.rows.items() if fid in rows}
        features: list[Record] = []
        for fid, props in zip(fetch, fetched, strict=True):
            new_rows.pop(fid, None)
            if props is None:
                continue  # vanished mid-pass: stays live until a listing proves it gone
            record = self._feature_record(rows[fid], project, props)
            if record is not None:
                features.append(record)
                new_rows[fid] = row_digest(rows[fid])
        self.stats.properties_fetched += len(fetch)
        self.stats.properties_reused += len(rows) - len(fetch)
        feature_keys = frozenset((project, "feature", fid) for fid in rows)
        # Digests only pay off when unchanged rows may be skipped; otherwise keep the
        # cursor small (switching N later costs one pass that reads everything).
        kept = dict(sorted(new_rows.items())) if every > 1 else {}
        return Snapshot(
            scope=scope,
            records=[*scenes, *features],
            cursor=ProjectState(passes, kept).dump(),
            listings=(
                Listing(
                    frozenset({project}), frozenset(r.key for r in scenes), frozenset({"scene"})
                ),
                Listing(frozenset({project}), feature_keys, frozenset({"feature"})),
            ),
        )

    def _feature_rows(self, listed: list[Any], project: str) -> dict[str, JSON]:
        rows: dict[str, JSON] = {}
        for row in listed:
            if not isinstance(row, dict):
                raise ProtocolError(f"project {project}: a feature row is not an object")
            rows[_identified(lambda r: _id(r, "feature"), row)] = row
        return rows

    def _scenes(self, rows: list[Any], project: str) -> list[Record]:
        return [_identified(lambda r: _scene_record(r, project), row) for row in rows]

    async def _all_properties(self, features: list[str]) -> list[list[Any] | None]:
        """Every feature's properties; on the first failure the rest are cancelled."""
        tasks = [asyncio.create_task(self._properties(fid)) for fid in features]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _properties(self, feature: str) -> list[Any] | None:
        try:
            return await self._list(f"/client/features/{feature}/properties")
        except NotFoundError:
            log.info("kartorium.feature_vanished", source=self.name, feature=feature)
            return None

    def _feature_record(self, row: JSON, project: str, props: list[Any]) -> Record | None:
        fid = _id(row, "feature")
        coordinate_string: Any = None
        extra: JSON = {}
        ordered = sorted((p for p in props if isinstance(p, dict)), key=_property_order)
        for prop in ordered:
            key = prop.get("key")
            if not isinstance(key, str):
                continue
            if key == COORDINATE_KEY:
                coordinate_string = prop.get("value")
            else:  # a repeated key: the highest property id (the newest) wins
                extra[key] = {"type": prop.get("type"), "value": prop.get("value")}
        geometry = None
        try:
            geometry = feature_geometry(row.get("type"), row.get("position"), coordinate_string)
        except InvalidGeometry as err:
            log.warning(
                "record.invalid_geometry",
                source=self.name,
                collection=project,
                kind="feature",
                id=fid,
                feature_type=row.get("type"),
                reason=str(err),
            )
        properties = {k: v for k, v in row.items() if k not in ("id", "name")}
        properties["props"] = extra
        record = Record(
            kind="feature",
            external_id=fid,
            collection=project,
            name=_text(row.get("name")),
            geometry=geometry,
            properties=properties,
        )
        try:
            canonical_json(properties)  # NaN/Infinity in a row: skip it, never claim it stored
        except ValueError:
            log.warning("record.skipped", source=self.name, id=fid, reason="non-JSON number")
            return None
        return record

    async def _list_projects(self) -> list[Any]:
        try:
            return await self._list("/client/projects")
        except AuthError as err:
            raise explain_auth(err) from None

    async def _list(self, path: str) -> list[Any]:
        async with self._slots:
            body = await self.http.get_json(f"{self.settings.base_url}{path}")
        return unwrap_list(body, path)


def _identified(read: Callable[[Any], _T], row: Any) -> _T:
    """`read(row)`, where a row whose identity cannot be read fails the whole listing.

    Why: skipping it would let the listing count as complete while one of the rows it
    was meant to prove live is unreadable, and tombstone that row (issue 6 found
    `[{"id": {...}}]` or `[1, "two"]` tombstoning every scene of a project).
    """
    try:
        return read(row)
    except RecordError as err:
        raise ProtocolError(f"listing has an unreadable row: {err.message}") from None


def _id(row: JSON, what: str) -> str:
    """Ids are positive integers (the page); digit strings are accepted too."""
    value = row.get("id")
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        raise RecordError(f"{what} without a positive integer id")
    if int(value) <= 0:
        raise RecordError(f"{what} without a positive integer id")
    return str(int(value))


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _property_order(prop: JSON) -> tuple[int, int]:
    pid = prop.get("id")
    return (0, pid) if isinstance(pid, int) and not isinstance(pid, bool) else (-1, 0)


def _project_record(row: Any) -> Record:
    if not isinstance(row, dict):
        raise RecordError("project is not an object")
    pid = _id(row, "project")
    name_key = "title" if "title" in row else "name"  # the page's example reads `title`
    return Record(
        kind="project",
        external_id=pid,
        collection=pid,
        name=_text(row.get(name_key)),
        properties={k: v for k, v in row.items() if k not in ("id", name_key)},
    )


def _scene_record(row: Any, project: str) -> Record:
    if not isinstance(row, dict):
        raise RecordError("scene is not an object")
    name_key = "name" if "name" in row else "title"
    return Record(
        kind="scene",
        external_id=_id(row, "scene"),
        collection=project,
        name=_text(row.get(name_key)),
        properties={k: v for k, v in row.items() if k not in ("id", name_key)},
    )
