"""`syncd check`: one line per source naming the exact problem, through the registry.

Why: `check` is what an operator runs after editing credentials; a vague "failed"
sends them to the logs, a leaked secret in its output is a security incident.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest

from syncd.cli import _check_source, build_parser, cmd_check
from syncd.sandbox.caltopo import CalTopoWorld
from tests.conftest import Sandbox
from tests.daemon_process import write_config
from tests.integration.test_daemon import caltopo_source, closed_port

OTHER_SECRET = base64.b64encode(b"not-the-secret").decode()


def revoke(world: CalTopoWorld) -> None:
    world.revoke()


def skew(world: CalTopoWorld) -> None:
    world.clock_skew = 600  # the server is 10 min ahead: our signatures arrive expired


def nothing(world: CalTopoWorld) -> None:
    return None


@pytest.mark.parametrize(
    ("overrides", "break_world", "expected"),
    [
        ({"credential_secret": OTHER_SECRET}, nothing, ["HTTP 401", "login required"]),
        ({}, revoke, ["HTTP 401"]),
        ({"team_id": "OTHER1"}, nothing, ["HTTP 403", "has no access to team OTHER1"]),
        ({}, skew, ["HTTP 401", "s behind the server's", "NTP"]),
        ({"base_url": "CLOSED"}, nothing, ["connection failed"]),
        ({"base_url": "http://nohost.invalid"}, nothing, ["DNS lookup failed", "nohost.invalid"]),
        ({"base_url": "TLS"}, nothing, ["TLS handshake failed"]),
    ],
    ids=["wrong-secret", "revoked", "wrong-team", "clock-skew", "upstream-down", "dns", "tls"],
)
async def test_check_names_the_problem(
    sandbox: Sandbox, overrides: dict[str, Any], break_world: Any, expected: list[str]
) -> None:
    world = sandbox.caltopo
    break_world(world)
    if overrides.get("base_url") == "CLOSED":
        overrides["base_url"] = f"http://127.0.0.1:{closed_port()}/caltopo"
    if overrides.get("base_url") == "TLS":  # https to a plain-HTTP server
        overrides["base_url"] = sandbox.url.replace("http://", "https://") + "/caltopo"
    settings = sandbox.caltopo_settings("sar", max_retries=0, **overrides)
    passed, detail = await _check_source(settings)
    assert not passed
    for text in expected:
        assert text in detail
    assert world.credential_secret not in detail
    assert OTHER_SECRET not in detail
    assert "signature=***" in detail or "signature" not in detail
    if break_world is skew:  # the Date header has whole seconds
        skew_s = int(re.search(r"local clock is (\d+) s behind", detail).group(1))  # type: ignore[union-attr]
        assert 598 <= skew_s <= 602


async def test_check_passes_with_one_cheap_request(sandbox: Sandbox) -> None:
    passed, detail = await _check_source(sandbox.caltopo_settings("sar"))
    assert (passed, detail) == (True, "team TEAM01: credential accepted")
    (request,) = sandbox.caltopo.request_log
    assert request.path == "/caltopo/api/v1/acct/TEAM01/since/" + str(request.since)
    assert request.since is not None and request.since > 0  # not a full since/0 read


async def test_check_warns_about_skew_it_survives(sandbox: Sandbox) -> None:
    sandbox.caltopo.clock_skew = -90  # server behind: signatures still valid, but close
    passed, detail = await _check_source(sandbox.caltopo_settings("sar"))
    assert passed
    assert "warning: the local clock is 90 s ahead of the server's" in detail


async def test_check_command_prints_a_line_per_source_and_fails_if_any_fails(
    sandbox: Sandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    down = caltopo_source(
        sandbox, "down", base_url=f"http://127.0.0.1:{closed_port()}/caltopo", max_retries=0
    )
    off = caltopo_source(sandbox, "off", enabled=False)
    config = write_config(
        tmp_path / "c.toml", tmp_path / "m.db", [caltopo_source(sandbox, "up"), down, off]
    )
    args = build_parser().parse_args(["check", "--config", str(config)])
    assert await cmd_check(args) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"config: ok ({config}, 3 source(s))"
    assert lines[1].startswith("database: ok (")
    assert "off (caltopo): skipped (disabled)" in lines
    assert "up (caltopo): ok: team TEAM01: credential accepted" in lines
    (down_line,) = [line for line in lines if line.startswith("down ")]
    assert down_line.startswith("down (caltopo): FAILED: GET http://127.0.0.1:")
    assert sandbox.caltopo.credential_secret not in "\n".join(lines)

    only_up = write_config(tmp_path / "up.toml", tmp_path / "m.db", [caltopo_source(sandbox, "up")])
    assert await cmd_check(build_parser().parse_args(["check", "--config", str(only_up)])) == 0
