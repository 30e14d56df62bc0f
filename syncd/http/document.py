"""JSON answers too large to hold parsed: kept as bytes, read back as streams.

`json.loads` of a 100k-object CalTopo map (46 MB) builds ~500 MB of Python objects
before the first row is written; that was most of a 641 MB peak RSS (issue 7) and
830 MB for a 200k-object map (issue 6). A `JsonDocument` keeps the body in a spooled
temporary file (in memory up to `SPOOL_MEMORY`, on disk beyond) and hands out its
parts with ijson's C backend, so only the objects being applied are alive.

ijson's C backend is stricter than the stdlib: it refuses NaN, Infinity and integers
beyond 64 bits. They are not JSON (RFC 8259), but upstreams send them, and with
`json.loads` such a value costs one record (`record.skipped`), not the whole answer.
`depth()` finds them in one C pass before anything is used, and a caller then parses
that document whole with the stdlib (`load()`), as before.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from itertools import accumulate, repeat
from operator import itemgetter
from tempfile import SpooledTemporaryFile
from typing import IO, Any, Final

import ijson

from syncd.errors import ProtocolError

SPOOL_MEMORY: Final = 4 * 1024 * 1024
"""Bodies up to this size stay in memory; larger ones go to a temporary file."""

_READ_SIZE: Final = 256 * 1024
_NESTING: Final = {"start_map": 1, "start_array": 1, "end_map": -1, "end_array": -1}


class NonStandardJson(ProtocolError):
    """The body is JSON only to the stdlib (NaN, Infinity, a >64-bit integer), or not
    JSON at all: `load()` tells which."""


def spool() -> IO[bytes]:
    """A file to write a body into, in memory until it outgrows `SPOOL_MEMORY`."""
    return SpooledTemporaryFile(max_size=SPOOL_MEMORY, mode="w+b")


class JsonDocument:
    """One response body, readable several times as a stream; close it when done."""

    def __init__(self, file: IO[bytes], size: int, *, url: str = "") -> None:
        self._file = file
        # A document dropped unread (a pass that stopped or failed before applying it)
        # still releases its file when collected; `close()` does it at once.
        self._release = weakref.finalize(self, file.close)
        self.size = size
        self.url = url
        """The redacted URL it came from, for error messages."""

    @classmethod
    def of(cls, body: bytes, *, url: str = "") -> JsonDocument:
        """A document of bytes already in memory (tests, small answers)."""
        file = spool()
        file.write(body)
        return cls(file, len(body), url=url)

    def close(self) -> None:
        self._release()

    def depth(self) -> int:
        """How deeply the body nests, by one linear pass in C that also proves it is
        JSON (ProtocolError if not, NonStandardJson if only the stdlib can read it).

        Checked before any prefix-tracking read: ijson keeps the path of every open
        container, so a 50,000-deep 100 KB body took 6 GB to read (issue 6 review).
        """
        self._file.seek(0)
        # C iterators end to end: a Python frame per event cost more than the parse.
        events = map(itemgetter(0), ijson.basic_parse(self._file, buf_size=_READ_SIZE))
        with self._errors():
            return max(accumulate(map(_NESTING.get, events, repeat(0))), default=0)

    def values(self, prefix: str) -> list[Any]:
        """Every value at `prefix` (ijson notation: `result.ids`), reading the whole body
        in C; call `depth()` first on a body that may nest deeply."""
        return list(self._events(ijson.items, prefix, use_float=True))

    def items(self, prefix: str) -> Iterator[Any]:
        """The elements of the array at `prefix`, one at a time (`result.features.item`)."""
        yield from self._events(ijson.items, prefix, use_float=True)

    def scalars(self, wanted: Collection[str], *, until: str) -> tuple[dict[str, Any], str | None]:
        """The scalar values at the `wanted` prefixes, read until the first event at
        `until` once every wanted value was seen (else to the end), and that event's
        kind (`start_array` ...) or None if `until` never came.

        An envelope's small fields usually precede its big array, so this reads a few
        events; the order is not relied on, only the cost depends on it.
        """
        found: dict[str, Any] = {}
        kind: str | None = None
        for prefix, event, value in self._events(ijson.parse, use_float=True):
            if prefix == until and kind is None:
                kind = event
                if len(found) == len(wanted):
                    break
            elif prefix in wanted and event not in ("start_map", "start_array", "map_key"):
                found[prefix] = value  # the last one wins, as with json.loads
        return found, kind

    def load(self) -> Any:
        """The whole body by the stdlib parser (small bodies, non-standard JSON)."""
        self._file.seek(0)
        try:
            return json.loads(self._file.read())
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise self._not_json("body is not JSON") from None

    def _events(self, parser: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        self._file.seek(0)
        with self._errors():
            yield from parser(self._file, *args, buf_size=_READ_SIZE, **kwargs)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """ijson's errors as syncd's: ProtocolError, or NonStandardJson for the stdlib."""
        try:
            yield
        except ijson.IncompleteJSONError as err:
            if _non_standard(str(err)):
                raise NonStandardJson(f"{self.url}: {_first_line(err)}", url=self.url) from None
            raise self._not_json(_first_line(err)) from None
        except ijson.JSONError as err:
            raise self._not_json(_first_line(err)) from None

    def _not_json(self, reason: str) -> ProtocolError:
        where = f"{self.url}: " if self.url else ""
        if self.size == 0:
            return ProtocolError(f"{where}empty body", url=self.url or None)
        return ProtocolError(f"{where}body is not valid JSON ({reason})", url=self.url or None)


def _non_standard(message: str) -> bool:
    # yajl's words for NaN/Infinity ("invalid char", "malformed number" for -Infinity)
    # and for numbers out of its 64-bit range.
    return any(
        words in message for words in ("invalid char in json text", "malformed number", "overflow")
    )


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    if text.startswith(("b'", 'b"')):
        text = text[2:]
    return text.splitlines()[0][:120] if text else type(err).__name__
