"""The Dockerfile and docker-compose.yml keep the properties deployments rely on.

Why: no Docker engine runs in CI, so these files are checked as data: a regression
(root user, no volume, no health check, a stop timeout shorter than the shutdown
grace) would otherwise only show in production.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from syncd.config import DaemonConfig, load_config
from syncd.units import parse_duration

ROOT = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def last(keyword: str) -> str:
    values = [rest for key, rest in instructions() if key == keyword]
    assert values, f"no {keyword} in the Dockerfile"
    return values[-1]


def test_dockerfile_is_multi_stage_on_slim_python_installing_from_constraints() -> None:
    bases = [rest for key, rest in instructions() if key == "FROM"]
    assert len(bases) >= 2
    assert all(re.match(r"python:3\.1\d-slim\b", base) for base in bases)
    runs = " ".join(rest for key, rest in instructions() if key == "RUN")
    assert "--constraint constraints.txt" in runs
    assert (ROOT / "constraints.txt").is_file()
    pins = (ROOT / "constraints.txt").read_text()
    for dependency in ("aiohttp", "sqlalchemy", "apscheduler", "prometheus-client"):
        assert re.search(rf"^{dependency}==\S+$", pins, re.M), dependency


def test_dockerfile_runs_syncd_run_as_non_root_with_data_volume_and_healthcheck() -> None:
    user = last("USER")
    assert user not in ("root", "0")
    assert "/data" in last("VOLUME")
    assert last("EXPOSE") == "8080"
    assert "/healthz" in last("HEALTHCHECK") or "healthz" in " ".join(
        rest for key, rest in instructions() if key == "ENV"
    )
    assert "CMD" in last("HEALTHCHECK")
    assert last("ENTRYPOINT") == '["syncd"]'
    assert last("CMD") == '["run"]'
    assert last("STOPSIGNAL") == "SIGTERM"


def test_image_configs_put_the_database_on_the_volume() -> None:
    """WORKDIR / makes the configs' relative `data/...` URLs land in /data."""
    assert last("WORKDIR") == "/"
    for name in ("syncd.example.toml", "demo.toml"):
        url = re.search(r'^url = "([^"]+)"', (ROOT / "config" / name).read_text(), re.M)
        assert url and url.group(1).startswith("sqlite+aiosqlite:///data/")


@pytest.fixture
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def test_compose_syncd_service(compose: dict[str, Any]) -> None:
    syncd = compose["services"]["syncd"]
    assert "profiles" not in syncd
    assert any(v.endswith(":/data") for v in syncd["volumes"])
    assert syncd["env_file"][0]["path"] == ".env"
    assert syncd["restart"] == "unless-stopped"
    assert "/healthz" in " ".join(syncd["healthcheck"]["test"])
    options = syncd["logging"]["options"]
    assert syncd["logging"]["driver"] == "json-file"
    assert options["max-size"] and int(options["max-file"]) >= 1
    assert "8080:8080" in syncd["ports"]
    # docker would SIGKILL a daemon still inside its shutdown grace
    grace = parse_duration(syncd["stop_grace_period"])
    assert grace > DaemonConfig().shutdown_grace


def test_compose_demo_profile_needs_no_credentials(compose: dict[str, Any]) -> None:
    sandbox, demo = compose["services"]["sandbox"], compose["services"]["demo"]
    assert sandbox["profiles"] == demo["profiles"] == ["demo"]
    assert sandbox["command"][0] == "sandbox"
    assert "--mutate-every" in sandbox["command"]
    assert "healthz" not in " ".join(sandbox["healthcheck"]["test"])
    assert demo["command"] == ["run", "--config", "/etc/syncd/demo.toml"]
    assert demo["depends_on"]["sandbox"]["condition"] == "service_healthy"
    assert "env_file" not in demo
    assert set(compose["volumes"]) >= {"syncd-data", "demo-data"}


def test_demo_config_resolves_to_the_compose_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    demo = next(
        s
        for s in yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"].values()
        if s.get("command", [None])[-1] == "/etc/syncd/demo.toml"
    )
    for key, value in demo["environment"].items():
        monkeypatch.setenv(key, value)
    config = load_config(ROOT / "config" / "demo.toml")
    assert config.server.host == "0.0.0.0"
    assert all(s.base_url.startswith("http://sandbox:8089/") for s in config.sources)  # type: ignore[attr-defined]


def test_make_run_starts_sandbox_and_daemon_on_demo_config() -> None:
    script = (ROOT / "scripts" / "demo").read_text()
    commands = [shlex.split(line) for line in script.splitlines() if "-m syncd" in line]
    assert any("sandbox" in c and "--mutate-every" in c for c in commands)
    assert any(c[-3:] == ["run", "--config", "config/demo.toml"] for c in commands)
    assert "trap" in script
