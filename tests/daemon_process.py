"""`syncd run` as a real subprocess, for tests: its JSON log lines read from the pipe.

Tests wait on log events or on the daemon's own `/status`, never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]

Event = dict[str, Any]


def write_config(path: Path, db_path: Path, sources: list[dict[str, Any]], **daemon: Any) -> Path:
    """A TOML config: SQLite file, JSON debug logs, server on a free port."""
    lines = [
        "[database]",
        f'url = "sqlite+aiosqlite:///{db_path}"',
        "[logging]",
        'level = "debug"',
        'format = "json"',
        "[server]",
        'host = "127.0.0.1"',
        "port = 0",
        "[daemon]",
        *(f"{key} = {json.dumps(value)}" for key, value in daemon.items()),
    ]
    for source in sources:
        lines.append("[[sources]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in source.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class DaemonProcess:
    """A running `python -m syncd run`; collects every JSON event it logs."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[Event] = []
        self.other_lines: list[str] = []
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, config: Path) -> DaemonProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "syncd",
            "run",
            "--config",
            str(config),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            async with self._changed:
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    self.other_lines.append(line)
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    def named(self, event: str, **fields: Any) -> list[Event]:
        return [
            e
            for e in self.events
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        ]

    async def wait_for(
        self, predicate: Callable[[list[Event]], bool], *, within: float = 30, what: str = ""
    ) -> None:
        """Until `predicate(events)` holds (checked on every new line)."""

        async def until() -> None:
            async with self._changed:
                while not predicate(self.events):
                    if self._reader.done():
                        raise AssertionError(f"daemon exited before {what}: {self.tail()}")
                    await self._changed.wait()

        try:
            await asyncio.wait_for(until(), within)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}: {self.tail()}") from None

    async def wait_event(
        self, event: str, *, count: int = 1, within: float = 30, **fields: Any
    ) -> Event:
        await self.wait_for(
            lambda _: len(self.named(event, **fields)) >= count, within=within, what=event
        )
        return self.named(event, **fields)[count - 1]

    async def server_url(self) -> str:
        started = await self.wait_event("daemon.started")
        return str(started["server"])

    async def get_json(self, path: str) -> Any:
        url = await self.server_url() + path
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return await response.json()

    async def wait_status(
        self, predicate: Callable[[dict[str, Any]], bool], *, within: float = 30
    ) -> dict[str, Any]:
        """Poll `/status` (the daemon's own report) until `predicate` holds."""
        deadline = asyncio.get_running_loop().time() + within
        while True:
            status = await self.get_json("/status")
            if predicate(status):
                return dict(status)
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"/status never matched: {status}")
            await asyncio.sleep(0.05)  # polling an external process's report, not a wait

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    async def wait_exit(self, within: float = 30) -> int:
        code = await asyncio.wait_for(self.proc.wait(), within)
        await self._reader
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()

    def tail(self, n: int = 15) -> str:
        lines = [json.dumps(e)[:300] for e in self.events[-n:]] + self.other_lines[-n:]
        return "\n".join(lines)
