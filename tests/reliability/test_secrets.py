"""Secrets never leak: recognisable credentials through every command and fault scenario.

Why: users paste these logs into tickets and ship the mirror to other teams; a
credential in stdout, stderr, an error message or a database row is a breach
(ARCHITECTURE.md §7). The sandbox is given canary credentials; every output of every
scenario, and every byte of the database afterwards, is searched for them (raw and,
for CalTopo's base64 secret, decoded).
"""

from __future__ import annotations

import base64
import dataclasses
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from syncd.config import load_config
from syncd.engine import Engine
from syncd.mirror import Database
from syncd.sandbox.caltopo import Fault
from syncd.sandbox.kartorium import READ_SCOPES
from tests.conftest import Sandbox
from tests.reliability.harness import syncd, write_config
from tests.reliability.platforms import PLATFORMS
from tests.reliability.tally import record

CALTOPO_RAW = b"SYNCD-CANARY-caltopo-secret-7f3a"
CALTOPO_SECRET = base64.b64encode(CALTOPO_RAW).decode()
KARTORIUM_KEY = "karta_live_SYNCDCANARY_kartorium_9b1c"
KATAPULT_KEY = "SYNCDCANARY-katapult-key-3c7e"  # sent in the query string: the risky one
# Credentials the sandbox refuses, for the 401 paths: just as secret.
WRONG = {
    "sar": base64.b64encode(b"SYNCD-CANARY-wrong-caltopo-51d2").decode(),
    "twin": "karta_live_SYNCDCANARY_wrong_4e8f",
    "poles": "SYNCDCANARY-katapult-wrong-8a1d",
}
CANARIES = [CALTOPO_SECRET, CALTOPO_RAW.decode(), KARTORIUM_KEY, KATAPULT_KEY, *WRONG.values()]
CANARIES.append(base64.b64decode(WRONG["sar"]).decode())

FAULTS = [
    Fault("", status=500, times=-1),
    Fault("", status=429, times=2, headers={"Retry-After": "0"}),
    Fault("", kind="invalid_json", times=-1),
    Fault("", kind="truncate", times=-1),
    Fault("", kind="reset", times=-1),
    Fault("", kind="json", body={"data": {"id": 1}}, times=-1),
]


def leaks(text: str) -> list[str]:
    return [c for c in CANARIES if c in text]


def database_text(db_file: Path) -> str:
    with sqlite3.connect(db_file) as conn:
        return "\n".join(conn.iterdump())


@pytest.fixture
def canary_sandbox(sandbox: Sandbox) -> Sandbox:
    sandbox.worlds.caltopo.credential_secret = CALTOPO_SECRET
    sandbox.worlds.kartorium.keys = {KARTORIUM_KEY: READ_SCOPES}
    sandbox.worlds.katapult.api_key = KATAPULT_KEY
    for platform in PLATFORMS:
        platform.build(sandbox.worlds)
    return sandbox


async def run_commands(
    sandbox: Sandbox, tmp: Path, commands: list[list[str]], secrets: dict[str, str] | None = None
) -> list[str]:
    os.makedirs(tmp, exist_ok=True)
    db_file = tmp / "mirror.db"
    config = str(
        write_config(
            tmp / "s.toml", db_file, sandbox.worlds, sandbox.url, PLATFORMS, secrets=secrets
        )
    )
    found: list[str] = []
    for command in commands:
        result = await syncd(*command, "--config", config)
        assert "Traceback" not in result.stderr, command
        found += [f"{' '.join(command)}: {c}" for c in leaks(result.stdout + result.stderr)]
    found += [f"database: {c}" for c in leaks(database_text(db_file))]
    return found


async def test_commands_and_a_revoked_key_leak_nothing(
    canary_sandbox: Sandbox, tmp_path: Path
) -> None:
    ok = await run_commands(canary_sandbox, tmp_path / "ok", [["sync"], ["status", "--json"]])
    wrong = await run_commands(canary_sandbox, tmp_path / "wrong", [["sync"]], secrets=WRONG)
    assert ok == [] and wrong == []
    record("secrets", scenarios=3)


async def test_every_fault_class_leaks_nothing_in_process(
    canary_sandbox: Sandbox, tmp_path: Path
) -> None:
    """Logs (all levels), outcome errors and exception messages, with each fault class."""
    sandbox = canary_sandbox
    config = write_config(
        tmp_path / "s.toml", tmp_path / "m.db", sandbox.worlds, sandbox.url, PLATFORMS
    )
    loaded = load_config(str(config))
    db = Database(loaded.database.url)
    await db.upgrade()
    texts: list[Any] = []
    try:
        for fault in FAULTS:
            for platform in PLATFORMS:
                platform.add_fault(
                    sandbox.worlds, dataclasses.replace(fault, match=platform.routes[1])
                )
            with capture_logs(processors=[merge_contextvars]) as logs:
                outcomes = [await Engine(db).sync(s) for s in loaded.sources]
            texts += [repr(logs), *(repr(o) for o in outcomes)]
            sandbox.worlds.caltopo.faults.clear()
            sandbox.worlds.kartorium.faults.clear()
            sandbox.worlds.katapult.faults.clear()
        for platform in PLATFORMS:
            platform.revoke(sandbox.worlds)
        with capture_logs(processors=[merge_contextvars]) as logs:
            outcomes = [await Engine(db).sync(s) for s in loaded.sources]
        assert {o.status for o in outcomes} == {"failed"}
        texts += [repr(logs), *(repr(o) for o in outcomes)]
    finally:
        await db.dispose()
    assert leaks("\n".join(texts)) == []
    assert leaks(database_text(tmp_path / "m.db")) == []
    record("secrets", scenarios=len(FAULTS) + 1)


@pytest.mark.reliability
async def test_every_command_and_fault_leaks_nothing(
    canary_sandbox: Sandbox, tmp_path: Path
) -> None:
    sandbox = canary_sandbox
    commands = [
        ["db", "upgrade"],
        ["db", "current"],
        ["sync"],
        ["sync", "--full"],
        ["sync", "--source", "twin"],
        ["status"],
        ["status", "--json"],
    ]
    found = await run_commands(sandbox, tmp_path / "commands", commands)
    for i, fault in enumerate(FAULTS):
        for platform in PLATFORMS:
            platform.add_fault(sandbox.worlds, dataclasses.replace(fault, match=platform.routes[1]))
        found += await run_commands(sandbox, tmp_path / f"fault{i}", [["sync"], ["status"]])
        sandbox.worlds.caltopo.faults.clear()
        sandbox.worlds.kartorium.faults.clear()
        sandbox.worlds.katapult.faults.clear()
    found += await run_commands(sandbox, tmp_path / "wrong", [["sync"], ["status"]], secrets=WRONG)
    for platform in PLATFORMS:
        platform.revoke(sandbox.worlds)
    found += await run_commands(
        sandbox,
        tmp_path / "revoked",
        [["sync"], ["status", "--json"]],
        secrets={"sar": CALTOPO_SECRET, "twin": KARTORIUM_KEY, "poles": KATAPULT_KEY},
    )
    assert found == []
    record("secrets", scenarios=len(commands) + 2 * len(FAULTS) + 4)
