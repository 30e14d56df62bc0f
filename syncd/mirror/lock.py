"""One pass per source at a time on a SQLite mirror, across processes.

Why (issue 6): two `syncd sync` processes on one SQLite file would both read the same
cursors, fetch the same changes and apply them; every apply is idempotent, but the
slower one could write older content and an older cursor over the newer pass. The
choice: the second process WAITS for the first to finish that source (logging
`sync.waiting` once), then syncs from the cursors the first stored, so it fetches
only what changed since and applies nothing twice.

The lock is an advisory `flock` on `<database file>.<source>.lock`, released by the
kernel when its process dies (even by SIGKILL), so a crash never leaves it held.
PostgreSQL mirrors are shared by replicas through their own leasing (ARCHITECTURE.md
§8); this lock only applies to SQLite files.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import structlog

from syncd.mirror.database import Database

log = structlog.get_logger(__name__)

POLL = 0.05  # seconds between attempts while another process holds the lock


def lock_path(db: Database, source: str) -> Path | None:
    """The lock file of `source` on this mirror, or None when the mirror is not a file."""
    database = db.url.database
    if db.dialect != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:"):
        return None
    return Path(database).expanduser().with_name(f"{Path(database).name}.{source}.lock")


@asynccontextmanager
async def source_lock(db: Database, source: str) -> AsyncIterator[None]:
    """Hold the source's pass lock; wait (without blocking the loop) while another has it."""
    path = lock_path(db, source)
    if path is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    log.info("sync.waiting", reason="another syncd process is syncing it")
                    waited = True
                await asyncio.sleep(POLL)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
