"""Katapult Pro API v3: the job list, then each job's nodes, connections, photos, traces.

Scopes: `job:<job_id>`, one per job; every entity's collection is its job id. The
job list (`GET /jobs`, no pagination) is read every pass and decides per job:

- full reconcile (GET job, nodes, connections with their sections, photos, traces;
  5 requests) when the job is new, its list entry changed (`last_updated`, `status`
  or `metadata` differ from the cursor's fingerprint), its nodes changed, `--full`,
  or `full_every` has passed since its last full reconcile. Only this pass proves
  deletions, and only when all five listings completed: the snapshot lists every live
  key of the job, so anything else of that job is tombstoned.
- skip (0 requests) when the entry carries `last_updated` and nothing changed.
- when the entry has no `last_updated` (it is optional), one probe
  `GET /jobs/:id/nodes?last_updated=<newest node seen>&limit=1` decides.

Connections, sections, photos and traces carry no change marker (FACTS.md), so a
change to them alone is seen when the job's `last_updated` moves or at the next
full reconcile. A mirrored job missing from a complete job list is asked about
(`GET /jobs/:id/status`): archived keeps its rows, 404 tombstones it all.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import quote

import structlog
from pydantic import Field, SecretStr

from syncd.errors import AuthError, NotFoundError, ProtocolError
from syncd.http import HttpClient, KeyLimiter, QueryKeyAuth
from syncd.records import JSON, Key, Listing, Record, ScopeFailed, Snapshot
from syncd.settings import BaseUrl, SourceSettings
from syncd.sources.fanout import fan_out
from syncd.sources.katapult_records import (
    connection_records,
    iso_time,
    job_record,
    node_record,
    plain_record,
)
from syncd.units import Duration

log = structlog.get_logger(__name__)

JOB_PATHS = "name,job_creator,job_owner,project_folder,project_id,status,done,map_styles,metadata"


class KatapultSettings(SourceSettings):
    """`type = "katapult"`: every job an API key can see (or the configured ones)."""

    file_secrets: ClassVar[frozenset[str]] = frozenset({"api_key"})

    type: Literal["katapult"]
    base_url: BaseUrl = "https://katapultpro.com/api/v3"
    api_key: Annotated[SecretStr, Field(min_length=1)]
    include_archived: bool = False
    metadata_filter: str | dict[str, str] | None = None
    """`"city:Buffalo,phase:2"`, or a table `{city = "Buffalo"}`; passed as `metadataFilter`."""
    jobs: list[str] | None = None
    """Only these job ids (default: every job the list returns)."""
    min_interval_ms: Annotated[float, Field(ge=0)] = 50.0
    token_bucket: bool = True
    full_every: Duration = 3600.0
    """How often each job is fully re-read; only that pass proves deletions."""
    token_refill_period: Annotated[Duration, Field(gt=0)] = 60.0
    """Katapult refills a key's bucket 60 s after `last_refill_time`; lower only for tests."""
    pacing_margin_ms: Annotated[float, Field(ge=0)] = 2.0
    """Added to `min_interval_ms` so network jitter never lands two requests too close."""

    def metadata_filter_param(self) -> str | None:
        """The filter as Katapult's `{attribute}:{value},...` text."""
        if isinstance(self.metadata_filter, dict):
            return ",".join(f"{k}:{v}" for k, v in self.metadata_filter.items()) or None
        return self.metadata_filter or None


def auth_for(settings: KatapultSettings) -> QueryKeyAuth:
    """Katapult takes the key only as `api_key` in the query (redacted by name everywhere)."""
    return QueryKeyAuth(settings.api_key.get_secret_value(), "api_key")


_LIMITERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, KeyLimiter]] = (
    weakref.WeakKeyDictionary()
)


def limiter_for(settings: KatapultSettings) -> KeyLimiter:
    """The one limiter of this API key at this base URL, kept across runs and sources.

    Katapult's limits are per key: a new run must not start its first request within
    50 ms of the previous run's last one, nor forget an empty bucket, and two sources
    sharing a key share its budget. Kept per event loop (asyncio primitives are
    loop-bound); the first source to use a key sets its options.
    """
    key = hashlib.sha256(
        f"{settings.base_url}\0{settings.api_key.get_secret_value()}".encode()
    ).hexdigest()
    limiters = _LIMITERS.setdefault(asyncio.get_running_loop(), {})
    if key not in limiters:
        limiters[key] = KeyLimiter(
            source=settings.name,
            min_interval=settings.min_interval_ms / 1000,
            margin=settings.pacing_margin_ms / 1000 if settings.min_interval_ms > 0 else 0.0,
            token_bucket=settings.token_bucket,
            refill_period=settings.token_refill_period,
        )
    return limiters[key]


@dataclass(frozen=True)
class JobCursor:
    """Per-job state, stored in the job's cursor row with the data it describes."""

    entry: str = ""
    """Fingerprint of the job's list entry at the last full reconcile."""
    nodes_after: str | None = None
    """Newest node `last_updated` seen (server time): the node probe's filter."""
    full_at: float = 0.0
    """Local epoch seconds of the last full reconcile (a schedule, not a data cursor)."""
    archived: bool = False

    def dump(self) -> str:
        return json.dumps(
            {
                "entry": self.entry,
                "nodes_after": self.nodes_after,
                "full_at": round(self.full_at, 3),
                "archived": self.archived,
            },
            sort_keys=True,
        )

    @classmethod
    def load(cls, text: str | None) -> JobCursor | None:
        """None when absent or unreadable: an unreadable cursor costs one full read."""
        if not text:
            return None
        try:
            raw = json.loads(text)
            return cls(
                entry=str(raw["entry"]),
                nodes_after=raw.get("nodes_after"),
                full_at=float(raw["full_at"]),
                archived=bool(raw.get("archived", False)),
            )
        except (ValueError, KeyError, TypeError):
            return None


def _gone_jobs(job_ids: list[str]) -> Snapshot:
    """Every job gone this pass, in one snapshot: cascades of the complete job list,
    weighed together against the source's whole mirror as maps gone from a CalTopo
    account are. One at a time, each would be judged against what the others left,
    and losing 3 of 4 jobs (a key that lost access) would pass the guard."""
    return Snapshot(
        scope="jobs",
        listings=tuple(Listing(frozenset({j}), frozenset(), cascade=True) for j in job_ids),
        drop_cursors=frozenset(f"job:{j}" for j in job_ids),
    )


class KatapultSource:
    """Reads the job list, then each job in scope with bounded concurrency."""

    def __init__(
        self,
        settings: KatapultSettings,
        http: HttpClient,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = settings.name
        self.settings = settings
        self.http = http
        self._clock = clock
        self.skipped_jobs = 0
        """Jobs left unread this pass because nothing signalled a change."""

    async def check(self) -> str:
        """The welcome route: authenticated and free of tokens (x-token-cost 0)."""
        try:
            body = await self.http.get_json(f"{self.settings.base_url}/")
        except ProtocolError as err:
            if err.status == 400:  # `MISSING API KEY` is a 400 from the middleware
                raise AuthError(err.message, url=err.url, status=err.status) from None
            raise
        if not isinstance(body, dict) or body.get("status") != "success":
            raise ProtocolError("welcome route did not answer success")
        return "API key accepted"

    async def snapshots(
        self, cursors: Mapping[str, str], *, full: bool = False
    ) -> AsyncIterator[Snapshot | ScopeFailed]:
        # The job list failing fails the source: without it nothing can be planned.
        entries = await self._job_list()
        listed = {str(e["id"]): e for e in entries}
        wanted = set(self.settings.jobs) if self.settings.jobs is not None else set(listed)
        known = {s.removeprefix("job:") for s in cursors if s.startswith("job:")}
        missing = sorted(
            j for j in known - set(listed) if j in wanted or self.settings.jobs is None
        )
        jobs = sorted(wanted & set(listed))

        gone: list[str] = []

        async def fetch(work: tuple[str, bool]) -> Snapshot | None:
            job_id, present = work
            cursor = None if full else JobCursor.load(cursors.get(f"job:{job_id}"))
            if present:
                return await self._job(job_id, listed[job_id], cursor)
            return await self._missing(job_id, cursor, gone)

        work = [(j, True) for j in jobs] + [(j, False) for j in missing]
        async for item in fan_out(
            work,
            fetch,
            scope_of=lambda w: f"job:{w[0]}",
            concurrency=self.settings.concurrency,
        ):
            yield item
        if gone:
            yield _gone_jobs(sorted(gone))

    # ---- planning --------------------------------------------------------------------

    async def _job(self, job_id: str, entry: JSON, cursor: JobCursor | None) -> Snapshot | None:
        fingerprint = _fingerprint(entry)
        if cursor is None or cursor.archived or self._due(cursor) or cursor.entry != fingerprint:
            return await self._reconcile(job_id, entry, fingerprint)
        if "last_updated" in entry:
            self.skipped_jobs += 1
            return None  # the job's own change stamp has not moved
        if cursor.nodes_after is None:
            return await self._reconcile(job_id, entry, fingerprint)
        changed = await self._list(
            f"/jobs/{quote(job_id)}/nodes", {"last_updated": cursor.nodes_after, "limit": "1"}
        )
        if changed:
            return await self._reconcile(job_id, entry, fingerprint)
        self.skipped_jobs += 1
        return None

    def _due(self, cursor: JobCursor) -> bool:
        return self._clock() - cursor.full_at >= self.settings.full_every

    # ---- reading ---------------------------------------------------------------------

    async def _reconcile(self, job_id: str, entry: JSON, fingerprint: str) -> Snapshot:
        """Every listing of the job; any failure raises, so nothing of it is applied."""
        base = f"/jobs/{quote(job_id)}"
        job = await self._data(base, {"paths": JOB_PATHS})
        nodes = await self._list(f"{base}/nodes")
        connections = await self._list(f"{base}/connections")
        photos = await self._list(f"{base}/photos")
        traces = await self._list(f"{base}/traces")

        records: list[Record] = [job_record(job_id, job, entry)]
        positions: dict[str, list[float]] = {}
        for raw in nodes:
            record = self._safe(node_record, raw, job_id)
            if record is not None:
                records.append(record)
                if isinstance(record.geometry, dict):
                    positions[record.external_id] = list(record.geometry["coordinates"])
        for raw in connections:
            records += self._safe_many(connection_records, raw, job_id, positions)
        for raw in photos:
            record = self._safe(plain_record, raw, job_id, "photo")
            if record is not None:
                records.append(record)
        for raw in traces:
            record = self._safe(plain_record, raw, job_id, "trace")
            if record is not None:
                records.append(record)

        keys: frozenset[Key] = frozenset(r.key for r in records)
        cursor = JobCursor(
            entry=fingerprint, nodes_after=_newest(nodes), full_at=self._clock(), archived=False
        )
        return Snapshot(
            scope=f"job:{job_id}",
            records=records,
            cursor=cursor.dump(),
            listings=(Listing(frozenset({job_id}), keys),),
        )

    async def _missing(
        self, job_id: str, cursor: JobCursor | None, gone: list[str]
    ) -> Snapshot | None:
        """A mirrored job the complete list no longer shows: ask what became of it.

        A job that is gone is added to `gone`, for the pass's one `_gone_jobs` snapshot.
        """
        if cursor is not None and cursor.archived and not self._due(cursor):
            return None
        scope = f"job:{job_id}"
        try:
            status = await self._data(f"/jobs/{quote(job_id)}/status")
        except NotFoundError:
            log.info("katapult.job_gone", source=self.name, job=job_id)
            gone.append(job_id)
            return None
        if status.get("status") == "archived" and not self.settings.include_archived:
            job = await self._data(f"/jobs/{quote(job_id)}", {"paths": JOB_PATHS})
            job["status"] = "archived"
            log.info("katapult.job_archived", source=self.name, job=job_id)
            kept = JobCursor(
                entry="",
                nodes_after=cursor.nodes_after if cursor else None,
                full_at=self._clock(),
                archived=True,
            )
            return Snapshot(scope=scope, records=[job_record(job_id, job, {})], cursor=kept.dump())
        log.info("katapult.job_unlisted", source=self.name, job=job_id, status=status.get("status"))
        return None

    async def _job_list(self) -> list[JSON]:
        params: dict[str, str] = {}
        if self.settings.include_archived:
            params["includeArchived"] = "true"
        if (metadata := self.settings.metadata_filter_param()) is not None:
            params["metadataFilter"] = metadata
        entries = await self._list("/jobs", params)
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                raise ProtocolError("job list entry without a string 'id'")
        return entries

    async def _list(self, path: str, params: Mapping[str, str] | None = None) -> list[Any]:
        data = await self._get(path, params)
        if not isinstance(data, list):
            raise ProtocolError(f"{path}: 'data' is not a list")
        return data

    async def _data(self, path: str, params: Mapping[str, str] | None = None) -> JSON:
        data = await self._get(path, params)
        if not isinstance(data, dict):
            raise ProtocolError(f"{path}: 'data' is not an object")
        return data

    async def _get(self, path: str, params: Mapping[str, str] | None) -> Any:
        body = await self.http.get_json(f"{self.settings.base_url}{path}", params=params)
        if not isinstance(body, dict) or body.get("status") != "success" or "data" not in body:
            raise ProtocolError(f"{path}: not a Katapult success envelope")
        return body["data"]

    def _safe(self, build: Callable[..., Record], raw: Any, *args: Any) -> Record | None:
        try:
            return build(raw, *args)
        except ValueError as err:
            log.warning("record.skipped", source=self.name, collection=args[0], reason=str(err))
            return None

    def _safe_many(self, build: Callable[..., list[Record]], raw: Any, *args: Any) -> list[Record]:
        try:
            return build(raw, *args, source=self.name)
        except ValueError as err:
            log.warning("record.skipped", source=self.name, collection=args[0], reason=str(err))
            return []


def _fingerprint(entry: JSON) -> str:
    """What the job list says about a job; any change to it means "read the job again"."""
    text = json.dumps(entry, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _newest(nodes: list[Any]) -> str | None:
    """The newest node `last_updated`, verbatim as the server wrote it."""
    stamps = [
        (when, n["last_updated"])
        for n in nodes
        if isinstance(n, dict) and (when := iso_time(n.get("last_updated"))) is not None
    ]
    return max(stamps)[1] if stamps else None
