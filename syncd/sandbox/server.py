"""`syncd sandbox`: every simulator on one loopback port, with a world that changes over time.

Each platform is mounted under its own prefix (CalTopo at /caltopo), so one
`base_url` per source in config/demo.toml points at it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import structlog
from aiohttp import web

from syncd.sandbox import caltopo, katapult

log = structlog.get_logger(__name__)


@dataclass
class Worlds:
    """The simulated state of every platform (each empty unless populated)."""

    caltopo: caltopo.CalTopoWorld = field(default_factory=caltopo.CalTopoWorld)
    katapult: katapult.KatapultWorld = field(default_factory=katapult.KatapultWorld)


def demo_worlds(seed: int = 1) -> Worlds:
    """Worlds populated with realistic demo data and the demo credentials of config/demo.toml."""
    world = caltopo.CalTopoWorld(seed=seed)
    caltopo.populate(world, maps=3, objects_per_map=25, seed=seed)
    poles = katapult.KatapultWorld(seed=seed)
    katapult.populate(poles, jobs=3, poles=8, seed=seed)
    return Worlds(caltopo=world, katapult=poles)


def create_app(worlds: Worlds) -> web.Application:
    """One application serving every simulator under its prefix."""
    app = web.Application()
    app.add_subapp(caltopo.PREFIX, caltopo.create_app(worlds.caltopo))
    app.add_subapp(katapult.PREFIX, katapult.create_app(worlds.katapult))
    return app


async def serve(
    *, host: str = "127.0.0.1", port: int = 8089, mutate_every: float = 5.0, seed: int = 1
) -> None:
    """Serve until cancelled (Ctrl-C), mutating the worlds every `mutate_every` seconds."""
    worlds = demo_worlds(seed)
    runner = web.AppRunner(create_app(worlds), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    mutator = (
        asyncio.create_task(caltopo.mutate_forever(worlds.caltopo, every=mutate_every, seed=seed))
        if mutate_every > 0
        else None
    )
    poles_mutator = (
        asyncio.create_task(katapult.mutate_forever(worlds.katapult, every=mutate_every, seed=seed))
        if mutate_every > 0
        else None
    )
    log.info(
        "sandbox.started",
        caltopo=f"http://{host}:{port}{caltopo.PREFIX}",
        team_id=worlds.caltopo.team_id,
        maps=len(worlds.caltopo.map_ids()),
        katapult=f"http://{host}:{port}{katapult.API}",
        mutate_every_s=mutate_every,
    )
    try:
        await asyncio.Event().wait()
    finally:
        if mutator is not None:
            mutator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await mutator
        if poles_mutator is not None:
            poles_mutator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poles_mutator
        await runner.cleanup()
        log.info("sandbox.stopped")
