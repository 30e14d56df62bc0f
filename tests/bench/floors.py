"""The physical floors the benchmark compares syncd with, measured in the same run.

A floor is the least any implementation must do: parse the bytes the sandbox sent with
the stdlib `json.loads`, and insert the same rows with a plain `sqlite3.executemany` in
one transaction into a table of the same shape (the `features` DDL, unique key
included) with the same pragmas the mirror uses. Turning parsed objects into rows
(serializing geometry and properties) is prepared outside the timed part, so the floor
is strict. Floors are the best of three timings (a floor is what the machine can do).
"""

from __future__ import annotations

import gc
import hashlib
import json
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.dialects import sqlite
from sqlalchemy.schema import CreateIndex, CreateTable

from syncd.mirror.models import features

Row = tuple[Any, ...]


def feature_rows(source: str, collection: str, parsed: list[dict[str, Any]]) -> list[Row]:
    """The rows a mirror holds for these CalTopo features, in `features` column order."""
    now = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ")
    rows: list[Row] = []
    for feature in parsed:
        props = feature["properties"]
        rest = {k: v for k, v in props.items() if k not in ("class", "title")}
        geometry = json.dumps(feature.get("geometry"), separators=(",", ":"))
        properties = json.dumps(rest, separators=(",", ":"))
        digest = hashlib.blake2b((geometry + properties).encode(), digest_size=32).hexdigest()
        rows.append(
            (
                source,
                collection,
                props["class"],
                feature["id"],
                props.get("title"),
                geometry,
                properties,
                digest,
                now,
                now,
                now,
                now,
                None,
                1,
            )
        )
    return rows


def insert_seconds(path: Path, rows: list[Row], repeat: int = 3) -> float:
    """Best of `repeat` timings of one committed `executemany` of `rows` into a fresh table."""
    return min(_insert_once(path, rows) for _ in range(repeat))


def _insert_once(path: Path, rows: list[Row]) -> float:
    path.unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(str(CreateTable(features).compile(dialect=sqlite.dialect())))
        for index in features.indexes:
            conn.execute(str(CreateIndex(index).compile(dialect=sqlite.dialect())))
        columns = [c.name for c in features.columns if c.name != "id"]
        sql = (
            f"INSERT INTO features ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' for _ in columns)})"
        )
        started = time.perf_counter()
        conn.execute("BEGIN")
        conn.executemany(sql, rows)
        conn.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        conn.close()


def parse_seconds(body: bytes, repeat: int = 3) -> tuple[float, Any]:
    """Best of `repeat` timings of the stdlib `json.loads` of one body (collector off: the
    floor is the parser alone), and what it parsed."""
    best = float("inf")
    for _ in range(repeat):
        gc.disable()
        try:
            started = time.perf_counter()
            parsed = json.loads(body)
            best = min(best, time.perf_counter() - started)
        finally:
            gc.enable()
        del parsed
    return best, json.loads(body)
