"""The normalized model every source produces and the mirror consumes.

A source turns one fetch of one scope into a `Snapshot`: the records it saw, the
cursor that produced them, and exactly what the response *proves* about deletions.
The mirror never infers a deletion a snapshot does not prove (ARCHITECTURE.md §1).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Container, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, Final, Protocol, TypeAlias

JSON: TypeAlias = dict[str, Any]

Key: TypeAlias = tuple[str, str, str]
"""Identity of a mirrored object within a source: (collection, kind, external_id)."""


class _Keep(Enum):
    KEEP = "KEEP"

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final = _Keep.KEEP
"""Marks a field a partial delta left out: the mirror keeps the stored value."""
Keep: TypeAlias = _Keep


@dataclass(frozen=True, slots=True)
class Record:
    """One upstream object, normalized.

    `name`, `geometry` and `properties` may be `KEEP` when the upstream sent a partial
    delta; `append_points` says the geometry carries only new points of a track.
    """

    kind: str
    external_id: str
    collection: str
    name: str | Keep | None = None
    geometry: JSON | Keep | None = None
    properties: JSON | Keep = field(default_factory=dict)
    remote_updated_at: datetime | None = None
    append_points: bool = False

    @property
    def key(self) -> Key:
        return (self.collection, self.kind, self.external_id)

    @property
    def is_partial(self) -> bool:
        return (
            self.append_points
            or self.name is KEEP
            or self.geometry is KEEP
            or self.properties is KEEP
        )


@dataclass(frozen=True, slots=True)
class Listing:
    """Proof that `keys` are ALL the live objects of a part of the mirror.

    The part is the source's rows in `collections` (every collection when None),
    restricted to `kinds` when given. Live rows of that part missing from `keys` (and
    from the snapshot's records) are tombstoned.
    """

    collections: frozenset[str] | None
    keys: Container[Key]
    """Read only by membership, and only after the snapshot's records were consumed: a
    streamed answer's proof may depend on what its records turned out to be."""
    kinds: frozenset[str] | None = None
    cascade: bool = False
    """Its tombstones follow from another listing of the same snapshot (a map gone from
    the account takes its objects along). The mass-delete guard judges the share of
    the parent scope's rows, and counts cascaded rows only toward its minimum."""

    def covers(self, key: Key) -> bool:
        collection, kind, _ = key
        return (self.collections is None or collection in self.collections) and (
            self.kinds is None or kind in self.kinds
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one fetch of one scope proved; applied by the mirror in one transaction."""

    scope: str
    records: Iterable[Record] = ()
    """May be a one-shot stream (a large answer parsed as it is applied): the mirror
    iterates it once, inside the snapshot's transaction, before reading the listings."""
    cursor: str | None = None
    listings: tuple[Listing, ...] = ()
    deleted: frozenset[Key] = frozenset()
    drop_cursors: frozenset[str] = frozenset()
    new_scopes: Mapping[str, str] = field(default_factory=dict)
    """Scopes discovered by this snapshot, with the cursor to start them from; stored
    only where the scope has no cursor yet, so a later pass still visits a scope whose
    first fetch failed."""


@dataclass(frozen=True, slots=True)
class ScopeFailed:
    """A scope whose fetch failed; the rest of the source's pass goes on."""

    scope: str
    error: Exception


class Source(Protocol):
    """One configured upstream. Owns auth, endpoints, paging and normalization."""

    name: str

    def snapshots(
        self, cursors: Mapping[str, str], *, full: bool = False
    ) -> AsyncIterator[Snapshot | ScopeFailed]:
        """Fetch every scope; `full` ignores the cursors' values (not their scopes).

        The consumer applies each snapshot before asking for the next, so a source
        may rely on an earlier snapshot being committed when it yields a later one.
        """
        ...

    async def check(self) -> str:
        """Make the cheapest authenticated call; return a short detail ("3 maps visible").

        Raises a SourceError (AuthError, TransportError ...) naming the problem, which
        `syncd check` prints as is.
        """
        ...
