"""One `Engine.sync` in its own process, so the benchmark reads that process's own peak RSS.

Usage: python -m tests.bench.sync_runner DB_URL SETTINGS_JSON [--profile OUT.txt]

It runs exactly what `syncd sync` runs for one source (open the mirror, upgrade it,
one engine pass) and prints one JSON line: the pass's wall time, the outcome's counts,
and the resident memory before the pass and at its peak (VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from syncd.cli import tune_gc
from syncd.engine import Engine
from syncd.logging import configure_logging
from syncd.mirror import Database
from syncd.sources import SourceConfig


def _status_kb(field: str) -> int:
    """A memory figure of this process from Linux /proc (VmRSS: now, VmHWM: peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


async def _run(db_url: str, settings_json: str, profile: str | None) -> dict[str, Any]:
    settings = TypeAdapter(SourceConfig).validate_python(json.loads(settings_json))
    db = Database(db_url)
    await db.upgrade()
    engine = Engine(db)
    rss_before = _status_kb("VmRSS")
    profiler = None
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler(async_mode="enabled")
        profiler.start()
    started = time.perf_counter()
    outcome = await engine.sync(settings)
    seconds = time.perf_counter() - started
    if profiler is not None:
        profiler.stop()
    await db.dispose()
    if profiler is not None and profile:
        text = profiler.output_text(unicode=False, color=False, show_all=False)
        await asyncio.to_thread(Path(profile).write_text, text)
    return {
        "seconds": seconds,
        "status": outcome.status,
        "error": outcome.error,
        "requests": outcome.requests,
        "inserted": outcome.inserted,
        "updated": outcome.updated + outcome.restored,
        "deleted": outcome.deleted,
        "unchanged": outcome.unchanged,
        "rss_before_kb": rss_before,
        # Not ru_maxrss: Linux carries the parent's RSS at fork into it across exec,
        # so a child of the benchmark (which holds the 100k world) reported ~600 MB.
        "peak_rss_kb": _status_kb("VmHWM"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db_url")
    parser.add_argument("settings_json")
    parser.add_argument("--profile")
    args = parser.parse_args()
    tune_gc()  # as `syncd` does at start
    configure_logging("warning", "json", stream=sys.stderr)
    print(json.dumps(asyncio.run(_run(args.db_url, args.settings_json, args.profile))))


if __name__ == "__main__":
    main()
