"""The `syncd` command as users run it: a subprocess against the sandbox over loopback.

Why: exit codes, one-line errors without tracebacks, and JSON log lines on stdout are
the CLI contract (ARCHITECTURE.md §6, §7); only a real process shows them.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from syncd.sandbox.caltopo import populate
from tests.conftest import Sandbox

SECRET_MARKER = "c3VwZXItc2VjcmV0LWNsaS12YWx1ZQ=="  # base64, recognisable, not the sandbox's


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


async def syncd(*args: str, env: dict[str, str] | None = None) -> Result:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "syncd",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


def write_config(tmp_path: Path, sandbox: Sandbox, secret: str | None = None) -> Path:
    world = sandbox.caltopo
    path = tmp_path / "syncd.toml"
    path.write_text(
        f"""
[database]
url = "sqlite+aiosqlite:///{tmp_path}/mirror.db"

[logging]
format = "json"

[[sources]]
name = "sar"
type = "caltopo"
base_url = "{sandbox.url}/caltopo"
team_id = "{world.team_id}"
credential_id = "{world.credential_id}"
credential_secret = "{secret or world.credential_secret}"
retry_backoff = "1ms"
max_retries = 0
"""
    )
    return path


async def test_sync_status_and_db(sandbox: Sandbox, tmp_path: Path) -> None:
    populate(sandbox.caltopo, maps=2, objects_per_map=5, seed=1)
    config = str(write_config(tmp_path, sandbox))

    first = await syncd("sync", "--config", config)

    assert first.code == 0, first.stderr
    events = first.events()
    assert all({"timestamp", "level", "event"} <= e.keys() for e in events)
    assert all(e["timestamp"].endswith("Z") for e in events)
    finished = [e for e in events if e["event"] == "sync.finished"]
    assert len(finished) == 1
    assert finished[0]["source"] == "sar" and finished[0]["status"] == "ok"
    assert finished[0]["inserted"] > 10 and "duration_ms" in finished[0]

    status = await syncd("status", "--config", config, "--json")
    assert status.code == 0
    [entry] = json.loads(status.stdout)
    assert entry["source"] == "sar" and entry["status"] == "ok"
    assert entry["live"] == finished[0]["inserted"]
    assert entry["scopes"] == 3 and entry["cursor_age_seconds"] is not None

    human = await syncd("status", "--config", config)
    assert human.code == 0 and human.stdout.startswith("sar: ok")

    current = await syncd("db", "current", "--config", config)
    assert current.code == 0 and "(head)" in current.stdout


async def test_failed_source_exits_1_without_leaking(sandbox: Sandbox, tmp_path: Path) -> None:
    populate(sandbox.caltopo, maps=1, objects_per_map=3, seed=1)
    config = str(write_config(tmp_path, sandbox, secret=SECRET_MARKER))

    result = await syncd("sync", "--config", config)

    assert result.code == 1
    [failed] = [e for e in result.events() if e["event"] == "sync.failed"]
    assert "HTTP 401" in failed["error"]
    assert SECRET_MARKER not in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


async def test_unknown_source_is_one_line(sandbox: Sandbox, tmp_path: Path) -> None:
    config = str(write_config(tmp_path, sandbox))
    result = await syncd("sync", "--config", config, "--source", "nope")
    assert result.code == 2
    assert result.stderr.strip().splitlines() == ["syncd: no source named 'nope' (configured: sar)"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "config file not found"),
        ("[database\n", "invalid TOML"),
        (
            '[[sources]]\nname = "a"\ntype = "caltopo"\ncredential_id = "x"\n'
            'credential_secret = "eHg="\n',
            "sources[0].team_id: missing required key",
        ),
        ('[logging]\nlevel = "loud"\n', "logging.level:"),
        ("surprise = 1\n", "surprise: unknown key"),
    ],
)
async def test_config_errors_exit_2_with_one_line(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    path = tmp_path / "syncd.toml"
    if content is not None:
        path.write_text(content)
    for command in (["sync"], ["status"], ["db", "upgrade"]):
        result = await syncd(*command, "--config", str(path))
        assert result.code == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"syncd: {path}") and expected in lines[0]
        assert "Traceback" not in result.stderr


async def test_unset_environment_variable_names_it(tmp_path: Path, sandbox: Sandbox) -> None:
    path = write_config(tmp_path, sandbox)
    path.write_text(
        path.read_text().replace(
            f'credential_secret = "{sandbox.caltopo.credential_secret}"',
            'credential_secret = "${SYNCD_TEST_UNSET_SECRET}"',
        )
    )
    result = await syncd("sync", "--config", str(path), env={"PATH": "/usr/bin:/bin"})
    assert result.code == 2
    assert (
        "sources[0].credential_secret: environment variable SYNCD_TEST_UNSET_SECRET is not set"
        in (result.stderr)
    )


async def test_config_from_environment_variable(sandbox: Sandbox, tmp_path: Path) -> None:
    config = str(write_config(tmp_path, sandbox))
    result = await syncd("db", "upgrade", env={"SYNCD_CONFIG": config, "PATH": "/usr/bin:/bin"})
    assert result.code == 0, result.stderr
    assert "mirror.db" in result.stdout


async def test_repeated_source_runs_once(sandbox: Sandbox, tmp_path: Path) -> None:
    populate(sandbox.caltopo, maps=1, objects_per_map=3, seed=1)
    config = str(write_config(tmp_path, sandbox))
    result = await syncd("sync", "--config", config, "--source", "sar", "--source", "sar")
    assert result.code == 0
    assert [e["event"] for e in result.events()].count("sync.started") == 1


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite+aiosqlite:///{tmp}/a-file/mirror.db", "cannot create the database folder"),
        ("postgresql://u@127.0.0.1:notaport/db", "database.url: not a database URL"),
    ],
)
async def test_bad_database_location_is_one_line(tmp_path: Path, url: str, expected: str) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    path = tmp_path / "syncd.toml"
    path.write_text(f'[database]\nurl = "{url.format(tmp=tmp_path)}"\n')
    result = await syncd("db", "upgrade", "--config", str(path))
    assert result.code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr
