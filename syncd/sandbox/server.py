"""`syncd sandbox`: every simulator on one loopback port, with a world that changes over time.

Each platform is mounted under its own prefix (CalTopo at /caltopo), so one
`base_url` per source in config/demo.toml points at it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import structlog
from aiohttp import web

from syncd.sandbox import caltopo, kartorium, katapult

log = structlog.get_logger(__name__)


@dataclass
class Worlds:
    """The simulated state of every platform (each empty unless populated)."""

    caltopo: caltopo.CalTopoWorld = field(default_factory=caltopo.CalTopoWorld)
    kartorium: kartorium.KartoriumWorld = field(default_factory=kartorium.KartoriumWorld)
    katapult: katapult.KatapultWorld = field(default_factory=katapult.KatapultWorld)


def demo_worlds(seed: int = 1) -> Worlds:
    """Worlds populated with realistic demo data and the demo credentials of config/demo.toml."""
    world = caltopo.CalTopoWorld(seed=seed)
    caltopo.populate(world, maps=3, objects_per_map=25, seed=seed)
    twin = kartorium.KartoriumWorld()
    kartorium.populate(twin, projects=2, features_per_scene=9, seed=seed)
    poles = katapult.KatapultWorld(seed=seed)
    katapult.populate(poles, jobs=3, poles=8, seed=seed)
    return Worlds(caltopo=world, kartorium=twin, katapult=poles)


def create_app(worlds: Worlds) -> web.Application:
    """One application serving every simulator under its prefix."""
    app = web.Application()
    app.add_subapp(caltopo.PREFIX, caltopo.create_app(worlds.caltopo))
    app.add_subapp(kartorium.PREFIX, kartorium.create_app(worlds.kartorium))
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
    mutators = (
        [
            asyncio.create_task(
                caltopo.mutate_forever(
                    worlds.caltopo, every=mutate_every, seed=seed, delete_every=4
                )
            ),
            asyncio.create_task(
                kartorium.mutate_forever(worlds.kartorium, every=mutate_every, seed=seed)
            ),
            asyncio.create_task(
                katapult.mutate_forever(worlds.katapult, every=mutate_every, seed=seed)
            ),
        ]
        if mutate_every > 0
        else []
    )
    log.info(
        "sandbox.started",
        caltopo=f"http://{host}:{port}{caltopo.PREFIX}",
        team_id=worlds.caltopo.team_id,
        kartorium=f"http://{host}:{port}{kartorium.API}",
        maps=len(worlds.caltopo.map_ids()),
        katapult=f"http://{host}:{port}{katapult.API}",
        mutate_every_s=mutate_every,
    )
    try:
        await asyncio.Event().wait()
    finally:
        for task in mutators:
            task.cancel()
        await asyncio.gather(*mutators, return_exceptions=True)
        await runner.cleanup()
        log.info("sandbox.stopped")
