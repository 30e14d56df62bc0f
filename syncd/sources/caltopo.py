"""CalTopo team API: signed `since/{ts}` polling of the account and of every map.

Scopes: `acct:<team_id>` (account objects: maps, folders) and `map:<map_id>` (one map's
objects). Cursors are the server's `timestamp` (re-read with a small overlap); a
response proves deletions only when it carries an `ids` map or answers `since/0`
(shared/apis/FACTS.md, CalTopo).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal
from urllib.parse import quote, urlsplit

import structlog
from pydantic import Field, SecretStr, field_validator

from syncd.errors import (
    AuthError,
    NotFoundError,
    ProtocolError,
    RecordError,
    UpstreamError,
)
from syncd.http import HttpClient, PreparedRequest
from syncd.http.document import JsonDocument, NonStandardJson
from syncd.records import JSON, KEEP, Key, Listing, Record, ScopeFailed, Snapshot
from syncd.settings import BaseUrl, SourceSettings
from syncd.sources.fanout import fan_out
from syncd.units import Duration

log = structlog.get_logger(__name__)

SIGNATURE_LIFETIME_MS = 2 * 60 * 1000  # the page's DEFAULT_TIMEOUT_MS
CLOCK_SKEW_WARN_S = 60.0  # half the signature lifetime: beyond it, 401s are near
MAP_CLASS = "CollaborativeMap"
MAX_DEPTH = 512


class CalTopoSettings(SourceSettings):
    """`type = "caltopo"`: a team's maps through a service account's credential."""

    file_secrets: ClassVar[frozenset[str]] = frozenset({"credential_secret"})

    type: Literal["caltopo"]
    base_url: BaseUrl = "https://caltopo.com"
    team_id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9]+$")
    credential_id: str = Field(min_length=1)
    credential_secret: SecretStr
    maps: list[str] | None = None
    """Only these map ids (default: every map the team can see)."""
    overlap: Duration = 0.5
    """How far before the stored cursor each poll re-reads (FACTS.md: 500 ms)."""

    @field_validator("credential_secret")
    @classmethod
    def _base64(cls, value: SecretStr) -> SecretStr:
        try:
            base64.b64decode(value.get_secret_value(), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("must be the base64 secret CalTopo issued") from None
        return value


def sign(method: str, path: str, expires: int, payload: str, credential_secret: str) -> str:
    """The page's reference `sign()`: base64(HMAC-SHA256(b64decode(secret), message))."""
    message = f"{method} {path}\n{expires}\n{payload}"
    secret = base64.b64decode(credential_secret)
    return base64.b64encode(hmac.new(secret, message.encode(), hashlib.sha256).digest()).decode()


class CalTopoAuth:
    """Signs each attempt afresh: `id`, `expires`, `signature` as query parameters."""

    def __init__(
        self, credential_id: str, credential_secret: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._id = credential_id
        self._secret = credential_secret
        self._clock = clock

    def __repr__(self) -> str:
        return f"CalTopoAuth(credential_id={self._id!r})"

    def apply(self, request: PreparedRequest) -> None:
        # The signed path is the URL path only, `since` value included, no query.
        path = urlsplit(request.url).path
        expires = int(self._clock() * 1000) + SIGNATURE_LIFETIME_MS
        request.params.update(
            id=self._id,
            expires=str(expires),
            signature=sign(request.method, path, expires, "", self._secret),
        )


def auth_for(settings: CalTopoSettings) -> CalTopoAuth:
    return CalTopoAuth(settings.credential_id, settings.credential_secret.get_secret_value())


class CalTopoSource:
    """Polls the account, then every map in scope with bounded concurrency."""

    def __init__(
        self,
        settings: CalTopoSettings,
        http: HttpClient,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = settings.name
        self.settings = settings
        self.http = http
        self._overlap_ms = round(settings.overlap * 1000)
        self._clock = clock

    async def check(self) -> str:
        """`acct/{team}/since/{now}`: signed, and empty because nothing changed since now.

        A signature expires 2 minutes after the *local* clock (FACTS.md), so a 401 from
        a client whose clock is off by more than a minute names the skew as the cause.
        """
        team = self.settings.team_id
        local = self._clock()
        try:
            result = await self._fetch(f"/api/v1/acct/{quote(team)}/since/{int(local * 1000)}")
        except AuthError as err:
            skew = self._skew(local, None)
            if skew is not None and abs(skew) > CLOCK_SKEW_WARN_S:
                raise AuthError(
                    f"{err.message}; the local clock is {_skew_text(skew)}: CalTopo "
                    "signatures expire 2 min after the local time, fix the clock (NTP)",
                    url=err.url,
                    status=err.status,
                ) from None
            if err.status == 403:
                raise AuthError(
                    f"{err.message}; credential {self.settings.credential_id} "
                    f"has no access to team {team}",
                    url=err.url,
                    status=err.status,
                ) from None
            raise
        detail = f"team {team}: credential accepted"
        skew = self._skew(local, int(_timestamp(result)) / 1000)
        if skew is not None and abs(skew) > CLOCK_SKEW_WARN_S:
            detail += f" (warning: the local clock is {_skew_text(skew)})"
        return detail

    def _skew(self, local: float, server: float | None) -> float | None:
        """Local minus server time in seconds, from the body's timestamp or the Date header."""
        if server is None and self.http.server_date is not None:
            server = self.http.server_date.timestamp()
        return None if server is None else local - server

    async def snapshots(
        self, cursors: Mapping[str, str], *, full: bool = False
    ) -> AsyncIterator[Snapshot | ScopeFailed]:
        account_scope = f"acct:{self.settings.team_id}"
        since = self._since(cursors.get(account_scope), full)
        # Any failure here fails the whole source: without the account we cannot
        # tell which maps exist, and bad credentials show up here first.
        result = await self._fetch(f"/api/v1/acct/{quote(self.settings.team_id)}/since/{since}")
        account, maps = self._account_snapshot(account_scope, result, since, cursors)
        yield account
        async for item in self._map_snapshots(sorted(maps), cursors, full):
            yield item

    def _account_snapshot(
        self, scope: str, result: JSON, since: int, cursors: Mapping[str, str]
    ) -> tuple[Snapshot, set[str]]:
        stream = _RecordStream(_list(result, "features"), scope, self.name)
        records = list(stream)
        listed = {r.external_id for r in records if r.kind == MAP_CLASS}
        known = {s.removeprefix("map:") for s in cursors if s.startswith("map:")}
        configured = set(self.settings.maps or ())
        listings: list[Listing] = []
        gone: set[str] = set()
        live: frozenset[Key] | None = None
        if result.get("ids") is not None:
            live = _ids_keys(result["ids"], scope)
        elif since == 0 and not stream.unidentified:
            live = frozenset(r.key for r in records) | stream.skipped
        if live is not None:
            listings.append(Listing(frozenset({scope}), live))
            live_maps = {external_id for _, kind, external_id in live if kind == MAP_CLASS}
            live_maps |= listed
            # A map the mirror holds that a complete account listing lacks is gone,
            # with everything on it. A map named in `maps` is judged by its own
            # answers instead: it may be shared with the team without being listed.
            gone = known - live_maps - configured
            listings += [Listing(frozenset({m}), frozenset(), cascade=True) for m in sorted(gone)]
            for map_id in sorted(gone):
                log.info("caltopo.map_gone", source=self.name, map=map_id)
        wanted = configured if self.settings.maps is not None else known | listed
        maps = wanted - gone
        return (
            Snapshot(
                scope=scope,
                records=records,
                cursor=_timestamp(result),
                listings=tuple(listings),
                drop_cursors=frozenset(f"map:{m}" for m in gone),
                new_scopes={f"map:{m}": "0" for m in maps if f"map:{m}" not in cursors},
            ),
            maps,
        )

    def _map_snapshots(
        self, maps: list[str], cursors: Mapping[str, str], full: bool
    ) -> AsyncIterator[Snapshot | ScopeFailed]:
        async def fetch(map_id: str) -> Snapshot:
            scope = f"map:{map_id}"
            return await self._map_snapshot(map_id, scope, self._since(cursors.get(scope), full))

        return fan_out(
            maps, fetch, scope_of=lambda m: f"map:{m}", concurrency=self.settings.concurrency
        )

    async def _map_snapshot(self, map_id: str, scope: str, since: int) -> Snapshot:
        """One map's answer as a snapshot whose records stream from the spooled body.

        A map can hold 100k+ objects: its features are parsed one at a time while the
        mirror applies them (syncd.http.document), never held whole.
        """
        path = f"/api/v1/map/{quote(map_id)}/since/{since}"
        document = await self.http.get_document(f"{self.settings.base_url}{path}")
        try:
            answer = _map_answer(document, path)
            ids = None if answer.ids is None else _ids_keys(answer.ids, map_id)
        except BaseException:
            document.close()
            raise
        stream = _RecordStream(answer.features, map_id, self.name, on_done=document.close)
        keys: Container[Key] | None = ids
        if ids is None and since == 0:
            # A since/0 answer is the map's whole state: its records are present by
            # construction; so are the features skipped as unusable (if identifiable).
            keys = _SkippedKeys(stream)
        return Snapshot(
            scope=scope,
            records=stream,
            cursor=answer.timestamp,
            listings=(Listing(frozenset({map_id}), keys),) if keys is not None else (),
        )

    def _since(self, cursor: str | None, full: bool) -> int:
        if full or cursor is None:
            return 0
        try:
            stored = int(cursor)
        except ValueError:
            return 0  # an unreadable cursor costs one full read, never a wrong delta
        return 0 if stored <= 0 else max(1, stored - self._overlap_ms)

    async def _fetch(self, path: str) -> JSON:
        url = f"{self.settings.base_url}{path}"
        body = await self.http.get_json(url)
        return _unwrap(body, path)


def _skew_text(skew: float) -> str:
    return f"{abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the server's"


def _unwrap(body: Any, path: str) -> JSON:
    """The `result` of a CalTopo envelope, or the error the envelope reports."""
    if not isinstance(body, dict):
        raise ProtocolError(f"{path}: response is not a JSON object")
    if body.get("status") != "ok":
        code = body.get("code")
        message = f"{path}: CalTopo error {code}: {str(body.get('message', ''))[:200]}"
        if code in (401, 403):
            raise AuthError(message, status=code)
        if code == 404:
            raise NotFoundError(message, status=code)
        if isinstance(code, int) and code >= 500:
            raise UpstreamError(message, status=code)
        raise ProtocolError(message)
    result = body.get("result")
    if not isinstance(result, dict):
        raise ProtocolError(f"{path}: response has no 'result' object")
    if "timestamp" not in result and "timestamp" in body:
        result["timestamp"] = body["timestamp"]
    _timestamp(result)  # validate before anything is applied
    return result


def _timestamp(result: JSON) -> str:
    value = result.get("timestamp")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ProtocolError("response has no valid server 'timestamp'")
    return str(value)


def _list(container: JSON, key: str) -> list[Any]:
    # "No change" is an empty list (FACTS.md); a missing one is a broken answer: taking
    # it for "no change" would advance the cursor past changes never received, and for
    # "empty" would make a since/0 answer prove that every object is gone.
    value = container.get(key)
    if not isinstance(value, list):
        raise ProtocolError(f"response field {key!r} is missing or not a list")
    return value


def _ids_keys(ids: Any, collection: str) -> frozenset[Key]:
    """Keys of every live object of the scope, from an `ids` map (class -> ids; a
    missing class means none)."""
    # Ids are strings; `[1, 2]` would match no stored row and prove everything gone.
    if not isinstance(ids, dict) or not all(
        isinstance(v, list) and all(isinstance(i, str) and i for i in v) for v in ids.values()
    ):
        raise ProtocolError("response field 'ids' is not a map of class to id strings")
    return frozenset(
        (collection, str(kind), str(external_id))
        for kind, values in ids.items()
        for external_id in values
    )


@dataclass(frozen=True)
class _MapAnswer:
    timestamp: str
    ids: Any
    features: Iterable[Any]


def _map_answer(document: JsonDocument, path: str) -> _MapAnswer:
    """A map answer's cursor, `ids` and features, reading the body as a stream.

    A first pass (in C) proves the body is JSON and not absurdly deep before anything
    is used, a second reads `ids`; the features are parsed only when the mirror pulls
    them. Anything but the usual shape (an error envelope, a missing `features`, NaN
    in the body) is parsed whole by the stdlib and judged exactly as before.
    """
    try:
        # A GeoJSON map nests about 8 deep; anything near the stdlib's recursion limit
        # goes to it and fails the scope there, as a whole parse always did.
        if document.depth() > MAX_DEPTH:
            return _whole_map_answer(document.load(), path)
        ids = document.values("result.ids")
        head, features = document.scalars(_HEAD, until="result.state.features")
    except NonStandardJson:
        return _whole_map_answer(document.load(), path)
    if head.get("status") != "ok" or features != "start_array":
        return _whole_map_answer(document.load(), path)
    stamp = head.get("result.timestamp", head.get("timestamp"))
    return _MapAnswer(
        timestamp=_timestamp({"timestamp": stamp}),
        ids=ids[-1] if ids else None,
        features=document.items("result.state.features.item"),
    )


_HEAD = frozenset({"status", "timestamp", "result.timestamp"})


def _whole_map_answer(body: Any, path: str) -> _MapAnswer:
    result = _unwrap(body, path)
    state = result.get("state")
    if not isinstance(state, dict):
        raise ProtocolError(f"{path}: response has no 'state' object")
    return _MapAnswer(_timestamp(result), result.get("ids"), _list(state, "features"))


class _RecordStream:
    """An answer's features as records, normalized as they are pulled (once).

    Unusable features are skipped with `record.skipped`; what is known of them (their
    keys, or that one had none) is complete once the stream has been read to its end.
    """

    def __init__(
        self,
        features: Iterable[Any],
        collection: str,
        source: str,
        *,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self._features = features
        self._collection = collection
        self._source = source
        self._on_done = on_done
        self.skipped: set[Key] = set()
        """Keys of features skipped as unusable but identifiable: present, not deleted."""
        self.unidentified = False
        """Some feature had no usable (class, id): the answer cannot prove absences."""
        self.done = False
        self._started = False

    def __iter__(self) -> Iterator[Record]:
        if self._started:  # a second pass would read nothing and then "prove" absences
            raise RuntimeError("a record stream can be read only once")
        self._started = True
        try:
            for feature in self._features:
                try:
                    yield normalize(feature, self._collection)
                except RecordError as err:
                    log.warning(
                        "record.skipped",
                        source=self._source,
                        collection=self._collection,
                        reason=err.message,
                    )
                    key = _identity(feature, self._collection)
                    if key is None:
                        self.unidentified = True
                    else:
                        self.skipped.add(key)
            self.done = True
        finally:
            if self._on_done is not None:
                self._on_done()


class _SkippedKeys:
    """The listing keys of a complete streamed answer beyond its records: the features
    it skipped, or every key when one could not be identified (proves no absence)."""

    def __init__(self, stream: _RecordStream) -> None:
        self._stream = stream

    def __contains__(self, key: object) -> bool:
        if not self._stream.done:
            raise RuntimeError("a streamed listing was read before its records")
        return self._stream.unidentified or key in self._stream.skipped


def _identity(feature: Any, collection: str) -> Key | None:
    """(collection, class, id) of a raw feature, if it has them."""
    if not isinstance(feature, dict) or not isinstance(feature.get("properties"), dict):
        return None
    external_id, kind = feature.get("id"), feature["properties"].get("class")
    if external_id in (None, "") or not isinstance(kind, str) or not kind:
        return None
    return (collection, kind, str(external_id))


def normalize(feature: Any, collection: str) -> Record:
    """A CalTopo GeoJSON feature as a Record (ARCHITECTURE.md §5, FACTS.md partial deltas)."""
    if not isinstance(feature, dict):
        raise RecordError("feature is not an object")
    external_id = feature.get("id")
    properties = feature.get("properties")
    if external_id in (None, "") or not isinstance(properties, dict):
        raise RecordError("feature without id or properties")
    kind = properties.get("class")
    if not isinstance(kind, str) or not kind:
        raise RecordError(f"feature {external_id}: no properties.class")
    geometry = feature.get("geometry", KEEP)
    if geometry is not KEEP and geometry is not None and not isinstance(geometry, dict):
        raise RecordError(f"feature {external_id}: geometry is not an object")
    incremental = isinstance(geometry, dict) and geometry.get("incremental") is True
    # No title means a geometry-only delta: keep the stored name and properties.
    partial = "title" not in properties
    rest = {k: v for k, v in properties.items() if k not in ("class", "title")}
    title = properties.get("title")
    return Record(
        kind=kind,
        external_id=str(external_id),
        collection=collection,
        name=KEEP if partial else (None if title is None else str(title)),
        geometry=geometry,
        properties=KEEP if partial else rest,
        remote_updated_at=_epoch_ms(properties.get("updated")),
        append_points=incremental,
    )


def _epoch_ms(value: Any) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return None
    try:
        return datetime.fromtimestamp(value / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return None
