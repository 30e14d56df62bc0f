"""The daemon's HTTP server (`[server]`): /healthz, /readyz, /status, /metrics.

`/healthz` answers from memory (the container health check must not depend on the
database); `/readyz` proves the database answers and its schema is at head; `/status`
joins the runs/cursors tables with what only the scheduler knows (next run,
consecutive failures, back-off).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from syncd import __version__
from syncd.errors import ConfigError, StorageError
from syncd.metrics import CONTENT_TYPE
from syncd.mirror.database import head_revision
from syncd.mirror.store import source_status, status_json

if TYPE_CHECKING:
    from syncd.scheduler import Daemon

log = structlog.get_logger(__name__)

DAEMON_KEY: web.AppKey[Daemon] = web.AppKey("daemon")


def create_app(daemon: Daemon) -> web.Application:
    """The application; separate from `start_server` so tests can serve it themselves."""
    app = web.Application()
    app[DAEMON_KEY] = daemon
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    return app


async def healthz(request: web.Request) -> web.Response:
    """200 while the process and its scheduler run; 503 once shutting down."""
    daemon = request.app[DAEMON_KEY]
    alive = daemon.alive
    body = {"status": "ok" if alive else "stopping", "scheduler_running": alive}
    return web.json_response(body, status=200 if alive else 503)


async def readyz(request: web.Request) -> web.Response:
    """200 when the database answers and its schema is at the head migration."""
    daemon = request.app[DAEMON_KEY]
    head = head_revision()
    try:
        current = await daemon.db.current()
    except StorageError as err:
        return web.json_response({"status": "unavailable", "error": err.message}, status=503)
    ready = current == head
    body = {"status": "ok" if ready else "migrations pending", "revision": current, "head": head}
    return web.json_response(body, status=200 if ready else 503)


async def status(request: web.Request) -> web.Response:
    """Per source: last run, status, counts, cursor age, next run, consecutive failures."""
    daemon = request.app[DAEMON_KEY]
    now = datetime.now(UTC)
    sources: list[dict[str, Any]] = []
    try:
        for name, state in daemon.sources.items():
            entry = status_json(await source_status(daemon.db, name), now)
            next_run = state.backoff_until or daemon.next_run_at(name)
            entry.update(
                type=state.settings.type,
                interval_s=state.settings.interval,
                running=state.running,
                next_run_at=_iso(next_run),
                consecutive_failures=state.consecutive_failures,
                backing_off=state.backoff_until is not None,
            )
            sources.append(entry)
    except StorageError as err:
        return web.json_response({"error": err.message}, status=503)
    body = {
        "version": __version__,
        "started_at": _iso(daemon.started_at),
        "stopping": daemon.stop.is_set(),
        "sources": sources,
    }
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition format."""
    body = request.app[DAEMON_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


@dataclass
class RunningServer:
    """A started server and the address it really listens on (port 0 picks one)."""

    runner: web.AppRunner
    url: str

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_server(daemon: Daemon, host: str, port: int) -> RunningServer:
    """Serve the app on host:port until `close()`."""
    runner = web.AppRunner(create_app(daemon), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as err:
        await runner.cleanup()
        raise ConfigError(f"server: cannot listen on {host}:{port}: {err.strerror}") from None
    addresses = runner.addresses
    bound = addresses[0][1] if addresses else port
    return RunningServer(runner, f"http://{host}:{bound}")
