"""The `syncd` command (ARCHITECTURE.md §6): run, sync, status, check, export, db, sandbox.

User mistakes (bad config, unknown source, unreachable database) end with one line
on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from syncd import __version__
from syncd.config import Config, config_path, load_config
from syncd.engine import Engine, RunOutcome, client_for
from syncd.errors import ConfigError, SyncdError
from syncd.export import FORMATS, ExportFilter, Format, export
from syncd.logging import configure_logging
from syncd.mirror import Database
from syncd.mirror.database import head_revision
from syncd.mirror.store import SourceStatus, source_status, status_json
from syncd.redact import redact_text
from syncd.settings import SourceSettings
from syncd.sources import SOURCE_TYPES

log = structlog.get_logger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="syncd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"syncd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--config",
            metavar="F",
            help="config file (default: $SYNCD_CONFIG or config/syncd.toml)",
        )
        return sub

    with_config("run", "the daemon: scheduler and health server until SIGTERM/SIGINT")

    sync = with_config("sync", "one pass of every (or the named) source, then exit")
    sync.add_argument(
        "--source", action="append", metavar="N", help="only this source (repeatable)"
    )
    sync.add_argument("--full", action="store_true", help="ignore stored cursors for this pass")
    sync.add_argument(
        "--allow-mass-delete",
        action="store_true",
        help="apply snapshots the mass-delete guard would hold",
    )

    status = with_config("status", "per source: last run, counts, cursor age, errors")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    with_config("check", "validate config, reach each source, verify credentials")

    export = with_config("export", "write the mirror as GeoJSON, GeoJSON Sequence or CSV")
    export.add_argument("--source", action="append", metavar="N", help="only this source")
    export.add_argument(
        "--collection", action="append", metavar="C", help="only this collection (map, job ...)"
    )
    export.add_argument("--kind", action="append", metavar="K", help="only this kind (Marker ...)")
    export.add_argument("--format", choices=FORMATS, default="geojson")
    export.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    export.add_argument(
        "--include-deleted", action="store_true", help="also rows tombstoned by a sync"
    )

    db = with_config("db", "database migrations")
    db.add_argument("action", choices=["upgrade", "current"])

    sandbox = commands.add_parser("sandbox", help="serve local simulators of every supported API")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8089, metavar="P")
    sandbox.add_argument(
        "--mutate-every",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds between random changes to the simulated world (0: never)",
    )
    sandbox.add_argument("--seed", type=int, default=1)
    return parser


def tune_gc() -> None:
    """Collect garbage less often than CPython's default (every 700 new containers).

    A sync builds millions of long-lived containers (parsed JSON, records, rows) and
    frees them together; with the default thresholds the collector re-walks that heap
    over and over, which made parsing a 100k-object map 3x slower (tests/bench, issue 7).
    Cycles are still collected, in larger batches.
    """
    gc.set_threshold(50_000, 20, 100)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `syncd` console script."""
    tune_gc()
    args = build_parser().parse_args(argv)
    handler = _COMMANDS[args.command]
    try:
        return asyncio.run(handler(args))
    except SyncdError as err:
        print(f"syncd: {redact_text(err.message)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(err, ConfigError) else EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _setup(args: argparse.Namespace, *, log_stream: Any = None) -> Config:
    config = load_config(args.config)
    configure_logging(config.logging.level, config.logging.format, stream=log_stream)
    return config


async def _open_database(config: Config) -> Database:
    db = Database(config.database.url, busy_timeout=config.database.busy_timeout)
    try:
        await db.upgrade()
    except SyncdError:
        await db.dispose()
        raise
    return db


async def cmd_sync(args: argparse.Namespace) -> int:
    config = _setup(args)
    # dict.fromkeys: `--source a --source a` must not run one source twice at once.
    names = list(dict.fromkeys(args.source or [s.name for s in config.sources if s.enabled]))
    selected = [config.source(name) for name in names]
    if not selected:
        raise ConfigError(f"{args.config or 'config'}: no enabled [[sources]] to sync")
    db = await _open_database(config)
    try:
        engine = Engine(db)
        outcomes = await asyncio.gather(
            *(
                engine.sync(s, full=args.full, allow_mass_delete=args.allow_mass_delete)
                for s in selected
            )
        )
    finally:
        await db.dispose()
    if sys.stderr.isatty():
        for outcome in outcomes:
            print(_summary(outcome), file=sys.stderr)
    return EXIT_OK if all(o.status == "ok" for o in outcomes) else EXIT_FAILED


def _summary(o: RunOutcome) -> str:
    text = (
        f"{o.source}: {o.status}  +{o.inserted} ~{o.updated + o.restored} -{o.deleted}"
        f"  ({o.requests} requests, {o.duration_ms} ms)"
    )
    return f"{text}  {o.error}" if o.error else text


async def cmd_run(args: argparse.Namespace) -> int:
    from syncd.scheduler import run_daemon

    config = _setup(args)
    db = await _open_database(config)
    try:
        return await run_daemon(config, db)
    finally:
        await db.dispose()


async def cmd_check(args: argparse.Namespace) -> int:
    """One line per source: ok with a detail, or the exact problem. Exit 1 if any failed."""
    config = _setup(args, log_stream=sys.stderr)
    print(f"config: ok ({config_path(args.config)}, {len(config.sources)} source(s))")
    ok = await _check_database(config)
    enabled = [s for s in config.sources if s.enabled]
    results = await asyncio.gather(*(_check_source(s) for s in enabled))
    for settings in config.sources:
        if not settings.enabled:
            print(f"{settings.name} ({settings.type}): skipped (disabled)")
    for settings, (passed, detail) in zip(enabled, results, strict=True):
        print(f"{settings.name} ({settings.type}): {'ok' if passed else 'FAILED'}: {detail}")
        ok = ok and passed
    return EXIT_OK if ok else EXIT_FAILED


async def _check_database(config: Config) -> bool:
    db = Database(config.database.url, busy_timeout=config.database.busy_timeout)
    try:
        current, head = await db.current(), head_revision()
    except SyncdError as err:
        print(f"database: FAILED: {redact_text(err.message)}")
        return False
    finally:
        await db.dispose()
    state = "at head" if current == head else "migrations pending (applied by `syncd run`)"
    print(f"database: ok ({db.display_url}, {state})")
    return True


async def _check_source(settings: SourceSettings) -> tuple[bool, str]:
    """The source's own cheapest authenticated call, through the registry; one retry."""
    try:
        async with client_for(settings, max_retries=min(settings.max_retries, 1)) as http:
            detail = await SOURCE_TYPES[settings.type].create(settings, http).check()
    except SyncdError as err:
        return False, redact_text(err.message)
    return True, redact_text(detail)


async def cmd_export(args: argparse.Namespace) -> int:
    """Stream the mirror to a file (written whole or not at all) or to stdout."""
    config = _setup(args, log_stream=sys.stderr)
    which = ExportFilter(
        sources=args.source or (),
        collections=args.collection or (),
        kinds=args.kind or (),
        include_deleted=args.include_deleted,
    )
    db = await _open_database(config)
    try:
        if args.output in (None, "-"):
            count = await export(db, sys.stdout, args.format, which)
            sys.stdout.flush()
        else:
            count = await _export_file(db, Path(args.output), args.format, which)
    finally:
        await db.dispose()
    log.info("export.finished", format=args.format, features=count, output=args.output or "-")
    return EXIT_OK


async def _export_file(db: Database, target: Path, fmt: Format, which: ExportFilter) -> int:
    partial = target.with_name(f".{target.name}.partial")
    try:
        with partial.open("w", encoding="utf-8", newline="") as out:
            count = await export(db, out, fmt, which)
        partial.replace(target)
    except OSError as err:
        raise ConfigError(f"-o {target}: cannot write: {err.strerror}") from None
    finally:
        partial.unlink(missing_ok=True)
    return count


async def cmd_status(args: argparse.Namespace) -> int:
    config = _setup(args, log_stream=sys.stderr)
    db = await _open_database(config)
    try:
        statuses = [await source_status(db, s.name) for s in config.sources]
    finally:
        await db.dispose()
    now = datetime.now(UTC)
    if args.json:
        print(json.dumps([status_json(s, now) for s in statuses], indent=2, default=str))
    else:
        for status in statuses:
            print(_status_text(status, now))
    return EXIT_OK


def _age(moment: datetime | None, now: datetime) -> float | None:
    return None if moment is None else round((now - moment).total_seconds(), 1)


def _status_text(s: SourceStatus, now: datetime) -> str:
    last = s.last_run
    if last is None:
        return f"{s.source}: never synced"
    age = _age(s.oldest_cursor_at, now)
    lines = [
        f"{s.source}: {last['status']}  last run #{last['id']}"
        f" at {last['started_at']:%Y-%m-%d %H:%M:%S}Z"
        f"  +{last['inserted']} ~{last['updated'] + last['restored']} -{last['deleted']}"
        f" ={last['unchanged']}  {last['requests']} requests",
        f"  rows: {s.live} live, {s.deleted} deleted; {s.scopes} scopes, oldest cursor "
        + (f"{age:.0f}s old" if age is not None else "none"),
    ]
    if s.last_error:
        lines.append(f"  last error: {s.last_error}")
    return "\n".join(lines)


async def cmd_db(args: argparse.Namespace) -> int:
    config = _setup(args, log_stream=sys.stderr)
    db = Database(config.database.url, busy_timeout=config.database.busy_timeout)
    try:
        if args.action == "upgrade":
            await db.upgrade()
            print(f"{db.display_url}: at revision {await db.current()} (head)")
        else:
            current, head = await db.current(), head_revision()
            state = "head" if current == head else f"head is {head}"
            print(f"{db.display_url}: at revision {current or 'none (empty database)'} ({state})")
    finally:
        await db.dispose()
    return EXIT_OK


async def cmd_sandbox(args: argparse.Namespace) -> int:
    from syncd.sandbox.server import serve

    configure_logging("info", os.environ.get("SYNCD_LOG_FORMAT", "auto"))
    try:
        await serve(host=args.host, port=args.port, mutate_every=args.mutate_every, seed=args.seed)
    except OSError as err:
        raise ConfigError(
            f"sandbox: cannot listen on {args.host}:{args.port}: {err.strerror}"
        ) from None
    return EXIT_OK


_COMMANDS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "run": cmd_run,
    "sync": cmd_sync,
    "status": cmd_status,
    "check": cmd_check,
    "export": cmd_export,
    "db": cmd_db,
    "sandbox": cmd_sandbox,
}
