"""`make bench`: syncd against its physical limits, measured on this machine in one run.

Why: a sync daemon's cost is upstream requests, CPU per record, database writes and
memory (issue 7). For CalTopo maps of 1k, 10k and 100k objects served by the sandbox
on loopback into a SQLite file, it measures the first sync end to end (in a child
process, so peak RSS is the sync's own), a no-change poll, a 1% change, the write path
alone (`Mirror.apply`), and compares each with a floor measured in the same run
(`tests/bench/floors.py`). Kartorium: requests per sync of a 10k-feature project.
Katapult: the achieved request rate of a 40-job sync against the 20 req/s ceiling,
and its 429s (`tests/bench/katapult_pacing.py`).
Targets are reported, never asserted: this is not part of `make test`.

Usage: python -m tests.bench.run [--sizes 1000,10000,100000] [--katapult-jobs 40]
       [--out DIR] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from syncd.cli import tune_gc
from syncd.http import PreparedRequest
from syncd.mirror import Database, Mirror
from syncd.records import Listing, Snapshot
from syncd.sandbox import caltopo, kartorium
from syncd.sandbox.server import Worlds, create_app
from syncd.sources.caltopo import CalTopoAuth, normalize
from tests.bench import floors, katapult_pacing
from tests.bench.report import Report

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tests" / "bench" / "results"


class Server:
    """The sandbox on a free loopback port, serving from this process's event loop."""

    def __init__(self, worlds: Worlds) -> None:
        self.worlds = worlds
        self.runner = web.AppRunner(create_app(worlds), access_log=None)
        self.url = ""

    async def __aenter__(self) -> Server:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.runner.cleanup()


async def run_sync(
    db_url: str, settings: dict[str, Any], profile: Path | None = None
) -> dict[str, Any]:
    """One sync in a child process (tests/bench/sync_runner.py); its JSON result."""
    args = [sys.executable, "-m", "tests.bench.sync_runner", db_url, json.dumps(settings)]
    if profile is not None:
        args += ["--profile", str(profile)]
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"sync runner failed: {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out)
    if result["status"] != "ok":
        raise RuntimeError(f"sync ended {result['status']}: {result['error']}")
    return result


def change_rows(db_path: Path) -> int:
    """Rows in the change feed: one per features row inserted, updated or tombstoned."""
    import sqlite3

    conn = sqlite3.connect(db_path)
    try:
        return int(conn.execute("SELECT count(*) FROM changes").fetchone()[0])
    finally:
        conn.close()


async def fetch_map(
    server: Server, world: caltopo.CalTopoWorld, map_id: str
) -> tuple[bytes, float]:
    """The bytes a first sync of the map receives, and how long the sandbox took to send them."""
    auth = CalTopoAuth(world.credential_id, world.credential_secret)
    url = f"{server.url}{caltopo.PREFIX}/api/v1/map/{map_id}/since/0"
    request = PreparedRequest("GET", url, {})
    auth.apply(request)
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        async with session.get(url, params=request.params) as resp:
            body = await resp.read()
        return body, time.perf_counter() - started


async def bench_caltopo(size: int, work: Path, profile_dir: Path | None) -> dict[str, Any]:
    """Every CalTopo figure for one map of `size` objects."""
    world = caltopo.CalTopoWorld(seed=size)
    started = time.perf_counter()
    map_id = world.add_map(f"Bench {size}")
    ids = caltopo.populate_map(world, map_id, size, seed=size)
    build_s = time.perf_counter() - started
    fig: dict[str, Any] = {"objects": size, "build_s": build_s}
    db_path = work / f"caltopo-{size}.db"
    db_url = f"sqlite+aiosqlite:///{db_path}"
    async with Server(Worlds(caltopo=world)) as server:
        settings = {
            "name": "bench",
            "type": "caltopo",
            "base_url": f"{server.url}{caltopo.PREFIX}",
            "team_id": world.team_id,
            "credential_id": world.credential_id,
            "credential_secret": world.credential_secret,
            "maps": [map_id],
            "timeout": 600,
        }
        body, fig["serve_s"] = await fetch_map(server, world, map_id)
        fig["body_bytes"] = len(body)
        fig["loads_s"], parsed = floors.parse_seconds(body)
        rows = floors.feature_rows("bench", map_id, parsed["result"]["state"]["features"])
        fig["insert_floor_s"] = floors.insert_seconds(work / "floor.db", rows)
        world.request_log.clear()
        fig["floor_s"] = fig["loads_s"] + fig["insert_floor_s"]
        del rows

        profile = (profile_dir / f"caltopo-{size}-initial.txt") if profile_dir else None
        fig["initial"] = await run_sync(db_url, settings, profile)
        fig["initial"]["change_rows"] = change_rows(db_path)
        profile = (profile_dir / f"caltopo-{size}-nochange.txt") if profile_dir else None
        fig["nochange"] = await run_sync(db_url, settings, profile)
        fig["nochange"]["change_rows"] = change_rows(db_path) - fig["initial"]["change_rows"]

        rng = random.Random(size)
        for obj_id in rng.sample(ids, max(1, size // 100)):
            cls = next(c for c in ("Marker", "Shape") if (c, obj_id) in world._maps[map_id])
            world.edit_object(map_id, cls, obj_id, {"description": f"edited {rng.random():.6f}"})
        before = change_rows(db_path)
        profile = (profile_dir / f"caltopo-{size}-change.txt") if profile_dir else None
        fig["change"] = await run_sync(db_url, settings, profile)
        fig["change"]["change_rows"] = change_rows(db_path) - before

    fig["write"] = await bench_write_path(work, map_id, parsed["result"]["state"]["features"])
    return fig


async def bench_write_path(work: Path, map_id: str, parsed: list[Any]) -> dict[str, float]:
    """`Mirror.apply` of one prepared snapshot against the plain-sqlite3 insert of its rows."""
    records = [normalize(feature, map_id) for feature in parsed]
    snapshot = Snapshot(
        scope=f"map:{map_id}",
        records=records,
        cursor="1",
        listings=(Listing(frozenset({map_id}), frozenset(r.key for r in records)),),
    )
    path = work / "write.db"
    path.unlink(missing_ok=True)
    db = Database(f"sqlite+aiosqlite:///{path}")
    await db.upgrade()
    try:
        started = time.perf_counter()
        result = await Mirror(db).apply("bench", snapshot)
        apply_s = time.perf_counter() - started
    finally:
        await db.dispose()
    assert result.inserted == len(records), result
    floor_s = floors.insert_seconds(work / "floor.db", floors.feature_rows("bench", map_id, parsed))
    return {"apply_s": apply_s, "floor_s": floor_s}


async def bench_kartorium(features: int, work: Path) -> dict[str, Any]:
    """Requests per sync of one project of `features` features, by route."""
    world = kartorium.KartoriumWorld()
    kartorium.populate(world, projects=1, features_per_scene=features, seed=1)
    db_url = f"sqlite+aiosqlite:///{work / 'kartorium.db'}"
    fig: dict[str, Any] = {"features": features}
    async with Server(Worlds(kartorium=world)) as server:
        settings = {
            "name": "twin",
            "type": "kartorium",
            "base_url": f"{server.url}{kartorium.API}",
            "api_key": kartorium.DEMO_KEY,
            "timeout": 600,
        }
        for run in ("initial", "second"):
            world.request_log.clear()
            fig[run] = await run_sync(db_url, settings)
            routes = Counter(
                "properties" if r.path.endswith("/properties") else "listings"
                for r in world.request_log
            )
            fig[run]["by_route"] = dict(routes)
    return fig


def machine() -> dict[str, Any]:
    """Cores, memory and CPU model of the machine the figures come from."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line),
        platform.processor() or "unknown",
    )
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem_kb = next((int(line.split()[1]) for line in meminfo.splitlines() if "MemTotal" in line), 0)
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "cpu": model,
        "python": platform.python_version(),
        "sqlite": __import__("sqlite3").sqlite_version,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


async def main_async(args: argparse.Namespace) -> None:
    tune_gc()  # as `syncd` does: the in-process write-path figure runs like the daemon
    sizes = [int(s) for s in args.sizes.split(",")]
    profile_dir = (args.out / "profiles") if args.profile else None
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="syncd-bench-") as tmp:
        work = Path(tmp)
        caltopo_figs = []
        for size in sizes:
            print(f"caltopo {size} objects ...", file=sys.stderr, flush=True)
            caltopo_figs.append(await bench_caltopo(size, work, profile_dir))
        print(f"kartorium {args.kartorium} features ...", file=sys.stderr, flush=True)
        kartorium_fig = await bench_kartorium(args.kartorium, work)
    katapult_fig = None
    if args.katapult_jobs > 0:
        print(f"katapult {args.katapult_jobs} jobs ...", file=sys.stderr, flush=True)
        # Its own simulator process, as a remote server would be (see katapult_pacing.py).
        with contextlib.redirect_stdout(sys.stderr):  # its detail lines; stdout is the report
            katapult_fig = await katapult_pacing.bench(args.katapult_jobs, 4, poles=10)
    report = Report(
        machine(),
        caltopo_figs,
        kartorium_fig,
        time.perf_counter() - started,
        katapult=katapult_fig,
    )
    text = report.markdown()
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.md").write_text(text)
    (args.out / "latest.json").write_text(json.dumps(report.raw(), indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--kartorium", type=int, default=10_000, help="features in the project")
    parser.add_argument(
        "--katapult-jobs", type=int, default=40, help="jobs in the Katapult pacing run (0: skip)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--profile", action="store_true", help="pyinstrument the syncs")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
