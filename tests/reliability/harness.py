"""Run `syncd` as a real process against the in-test sandbox, and read a mirror back.

Why: a SIGKILL only means something to a real process; the sandbox must outlive it, so
the sandbox stays in the test process (aiohttp TestServer) and only syncd is spawned.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from syncd.config import load_config
from syncd.engine import Engine
from syncd.mirror import Database
from syncd.sandbox.server import Worlds
from tests.reliability.platforms import Platform

KILLED = -signal.SIGKILL


@dataclass
class Result:
    """How one `syncd` process ended and what it wrote."""

    code: int
    stdout: str
    stderr: str
    peak_rss_kb: int = 0
    """The process's resident high-water mark (VmHWM), last read while it ran."""

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]


def write_config(
    path: Path,
    db_file: Path,
    worlds: Worlds,
    url: str,
    platforms: tuple[Platform, ...],
    *,
    secrets: dict[str, str] | None = None,
) -> Path:
    """A config with one source per platform on the given SQLite file; `secrets` replaces
    a platform's credential (by source name) with one the sandbox will refuse."""
    blocks = "".join(p.source_toml(worlds, url, (secrets or {}).get(p.name)) for p in platforms)
    path.write_text(
        f'[database]\nurl = "sqlite+aiosqlite:///{db_file}"\nbusy_timeout = 30\n\n'
        f'[logging]\nlevel = "debug"\nformat = "json"\n{blocks}'
    )
    return path


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment minus any armed fault hook, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    env.update(extra)
    return env


async def syncd(
    *args: str,
    env: dict[str, str] | None = None,
    kill_after: float | None = None,
    limit: float = 90,
) -> Result:
    """Run `python -m syncd ARGS`; with `kill_after`, SIGKILL it after that many seconds."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "syncd",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env if env is not None else child_env(),
    )
    communicate = asyncio.ensure_future(process.communicate())
    peak = asyncio.ensure_future(_high_water_kb(process.pid, communicate))
    if kill_after is not None:
        done, _ = await asyncio.wait({communicate}, timeout=kill_after)
        if not done:
            process.send_signal(signal.SIGKILL)
    out, err = await asyncio.wait_for(communicate, timeout=limit)
    assert process.returncode is not None
    return Result(
        process.returncode,
        out.decode(errors="replace"),
        err.decode(errors="replace"),
        await peak,
    )


async def _high_water_kb(pid: int, running: asyncio.Future[Any]) -> int:
    """VmHWM of a child, read every 20 ms until it ends: the kernel keeps the peak, so
    only growth in the last 20 ms could be missed. (`ru_maxrss` of children is no use:
    Linux counts the RSS the child shared with this big test process at fork.)"""
    peak = 0
    status = Path(f"/proc/{pid}/status")
    while not running.done():
        try:
            text = status.read_text()  # noqa: ASYNC240 - procfs answers from memory
        except OSError:
            break
        for line in text.splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]))
        await asyncio.wait({running}, timeout=0.02)
    return peak


# Alembic keeps module-global state: one upgrade at a time in this process (per event loop,
# since each test has its own loop).
_UPGRADES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


async def sync_in_process(config: Path) -> list[str]:
    """What `syncd sync --config F` does, in this process (a fresh engine on the file):
    "status" or "status: error" per source. Used where the process itself is not under
    test, because starting Python costs about a second."""
    loaded = load_config(str(config))
    db = Database(loaded.database.url, busy_timeout=loaded.database.busy_timeout)
    try:
        lock = _UPGRADES.setdefault(asyncio.get_running_loop(), asyncio.Lock())
        async with lock:
            await db.upgrade()
        engine = Engine(db)
        outcomes = [await engine.sync(s) for s in loaded.sources if s.enabled]
        return [o.status if o.error is None else f"{o.status}: {o.error}" for o in outcomes]
    finally:
        await db.dispose()


def integrity(db_file: Path) -> str:
    """SQLite's own verdict on the file (reads the WAL, as any next connection does)."""
    conn = sqlite3.connect(db_file)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def mirror_state(db_file: Path) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    """Every features row by key, with its change-feed ops, as a comparable value."""
    conn = sqlite3.connect(db_file)
    conn.row_factory = sqlite3.Row
    try:
        ops: dict[int, list[tuple[str, int]]] = {}
        for row in conn.execute("SELECT feature_id, op, version FROM changes ORDER BY seq"):
            ops.setdefault(row["feature_id"], []).append((row["op"], row["version"]))
        state = {}
        for row in conn.execute("SELECT * FROM features"):
            key = (row["source"], row["collection"], row["kind"], row["external_id"])
            state[key] = {
                "name": row["name"],
                "geometry": json.loads(row["geometry"]) if row["geometry"] else None,
                "properties": json.loads(row["properties"]),
                "live": row["deleted_at"] is None,
                "version": row["version"],
                "content_hash": row["content_hash"],
                "ops": ops.get(row["id"], []),
            }
        return state
    finally:
        conn.close()


def cursors_of(db_file: Path) -> dict[tuple[str, str], str]:
    conn = sqlite3.connect(db_file)
    try:
        return {
            (s, sc): c for s, sc, c in conn.execute("SELECT source, scope, cursor FROM cursors")
        }
    finally:
        conn.close()


def runs_of(db_file: Path) -> list[tuple[int, str, str | None]]:
    """Every runs row as (id, status, error), oldest first."""
    conn = sqlite3.connect(db_file)
    try:
        return [
            (int(i), str(status), error)
            for i, status, error in conn.execute("SELECT id, status, error FROM runs ORDER BY id")
        ]
    finally:
        conn.close()


def assert_matches_world(
    state: dict[tuple[str, str, str, str], dict[str, Any]],
    worlds: Worlds,
    platforms: tuple[Platform, ...],
) -> None:
    """Live rows are exactly the upstream's live objects (name, geometry); the rest are
    tombstones, never lost rows: every object of a deleted container is one."""
    for platform in platforms:
        expected = platform.expected(worlds)
        rows = {k[1:]: v for k, v in state.items() if k[0] == platform.name}
        live = {k: (v["name"], v["geometry"]) for k, v in rows.items() if v["live"]}
        assert live == expected, f"{platform.name}: live rows differ from the sandbox world"
        tombstones = {k for k, v in rows.items() if not v["live"]}
        missing = sorted(platform.gone(worlds) - tombstones)
        assert not missing, f"{platform.name}: deleted upstream, not tombstoned: {missing}"
