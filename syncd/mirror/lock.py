"""One pass per source at a time on a mirror, across processes, on SQLite and PostgreSQL.

Why (issue 6): two `syncd sync` processes on one mirror would both read the same
cursors, fetch the same changes and apply them; every apply is idempotent, but the
slower one could write older content and an older cursor over the newer pass. The
choice: the second process WAITS for the first to finish that source (logging
`sync.waiting` once), then syncs from the cursors the first stored, so it fetches
only what changed since and applies nothing twice.

The lock dies with the process that holds it, even by SIGKILL, so a crash never leaves
it held:
- SQLite file: an advisory `flock` on `<database file>.<source>.lock`, released by the
  kernel when the descriptor closes or its process dies.
- PostgreSQL: a session advisory lock, `pg_try_advisory_lock(NAMESPACE, crc32(source))`,
  taken on a connection of its own (`Database.dedicated`, outside the pool) and held
  for the pass; the server releases it when that session ends: closed at the end of
  the pass, or dropped when the process dies. Advisory locks are per database, so two
  mirrors on one server never wait for each other. Two source names with the same
  CRC-32 would only take turns, never run a pass of the same source twice.

Holding the lock is also a proof: no other pass of that source is running on this
mirror, so the source's runs rows still `running` were left by a process that ended
mid-run, and the engine closes them as `failed` (`run.interrupted`). A mirror with no
lock (in-memory SQLite, a `file:` URI) proves nothing and gets no such clean-up
(`source_lock` yields False).

Limits: the lock is only as good as everyone taking it. The SQLite lock file is found
by the database path as configured (a symlinked path gets a lock of its own); on
PostgreSQL, a lock session that is cut mid-pass (server restart, a connection killed
by an idle timeout) frees the lock while the pass goes on, and a second pass may then
start and close the first's row early; the first rewrites it when it finishes. A host
that loses power holds its PostgreSQL lock until the server notices the connection is
gone (its TCP keepalive settings), so the other processes wait that long.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import structlog
from sqlalchemy import text

from syncd.mirror.database import Database

log = structlog.get_logger(__name__)

POLL = 0.05  # seconds between attempts while another process holds the lock
NAMESPACE = 0x73796E63  # "sync": the first key of every pass lock (pg_locks.classid)
_TRY_LOCK = text("SELECT pg_try_advisory_lock(:namespace, :key)")


def lock_path(db: Database, source: str) -> Path | None:
    """The lock file of `source` on this mirror, or None when the mirror is not a file."""
    database = db.url.database
    if db.dialect != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:"):
        return None
    return Path(database).expanduser().with_name(f"{Path(database).name}.{source}.lock")


def pg_lock_key(source: str) -> int:
    """The second key of the source's PostgreSQL advisory lock (a signed 32-bit int)."""
    crc = zlib.crc32(source.encode())
    return crc - (1 << 32) if crc >= 1 << 31 else crc


@asynccontextmanager
async def source_lock(db: Database, source: str) -> AsyncIterator[bool]:
    """Hold the source's pass lock; wait (without blocking the loop) while another has it.

    Yields whether the lock proves this pass the only one of the source (False only
    for a mirror no lock applies to). Raises StorageError when PostgreSQL cannot be
    reached to take it.
    """
    if db.dialect == "postgresql":
        async with _pg_lock(db, source):
            yield True
        return
    path = lock_path(db, source)
    if path is None:
        yield False
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = _waiting(source, waited)
                await asyncio.sleep(POLL)
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@asynccontextmanager
async def _pg_lock(db: Database, source: str) -> AsyncIterator[None]:
    key = {"namespace": NAMESPACE, "key": pg_lock_key(source)}
    async with db.dedicated() as conn:
        waited = False
        while not (await conn.execute(_TRY_LOCK, key)).scalar():
            waited = _waiting(source, waited)
            await asyncio.sleep(POLL)
        yield
    # Closing the dedicated connection ended its session, which released the lock.


def _waiting(source: str, waited: bool) -> bool:
    if not waited:
        log.info("sync.waiting", source=source, reason="another syncd process is syncing it")
    return True
