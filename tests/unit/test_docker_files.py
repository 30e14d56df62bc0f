"""What the Dockerfile and docker-compose.yml refer to exists and is accepted by syncd.

Why: no Docker engine runs here, so a missing COPY source, a compose command line
syncd would refuse, or a wheel without migrations would only show at deploy time.
(The deployment shape itself is checked in test_deploy_files.py.)
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from syncd.cli import build_parser

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def words(self) -> list[str]:
        """Arguments in exec (JSON array) form or shell form."""
        if self.args.startswith("["):
            return list(json.loads(self.args))
        return shlex.split(self.args)


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """Instructions grouped by build stage (each FROM starts one)."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    stages: list[list[Instruction]] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip())
        if instruction.keyword == "FROM":
            stages.append([])
        assert stages, f"instruction before FROM: {line}"
        stages[-1].append(instruction)
    return stages


@pytest.fixture(scope="module")
def stages() -> list[list[Instruction]]:
    return parse_dockerfile((REPO / "Dockerfile").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def final(stages: list[list[Instruction]]) -> list[Instruction]:
    return stages[-1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _all(stage: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in stage if i.keyword == keyword]


def _last(stage: list[Instruction], keyword: str) -> Instruction:
    found = _all(stage, keyword)
    assert found, f"no {keyword} in the final stage"
    return found[-1]


# --- Dockerfile ------------------------------------------------------------------------


def test_dockerfile_copies_only_files_that_exist(stages: list[list[Instruction]]) -> None:
    for stage in stages:
        for copy in _all(stage, "COPY"):
            words = [w for w in copy.words() if not w.startswith("--")]
            if any(w.startswith("--from=") for w in copy.words()):
                continue
            for source in words[:-1]:
                assert (REPO / source).exists(), f"COPY source missing: {source}"


def test_wheel_ships_the_migrations_the_image_needs() -> None:
    # The final stage copies only the virtualenv, so migrations must be in the wheel.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    force_include = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert force_include.get("migrations") == "syncd/_migrations"


# --- docker-compose.yml ----------------------------------------------------------------


def _volume_targets(service: dict[str, Any]) -> dict[str, str]:
    """Mount target -> source, for short ("src:dst[:ro]") and long syntax."""
    targets: dict[str, str] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        targets[target] = source
    return targets


def _env_files(service: dict[str, Any]) -> list[str]:
    value = service.get("env_file", [])
    items = [value] if isinstance(value, str | dict) else value
    return [item if isinstance(item, str) else item["path"] for item in items]


@pytest.mark.parametrize("name", ["syncd", "sandbox", "demo"])
def test_compose_commands_are_valid_syncd_command_lines(
    compose: dict[str, Any], final: list[Instruction], name: str
) -> None:
    service = compose["services"].get(name)
    if service is None:
        pytest.skip(f"no {name} service")
    command = service["command"]
    words = shlex.split(command) if isinstance(command, str) else list(command)
    args = build_parser().parse_args(words)
    config = getattr(args, "config", None)
    if config is not None:
        baked = {copy.words()[-1] for copy in _all(final, "COPY")}
        assert str(config) in _volume_targets(service) or str(config) in baked, (
            f"{config} is neither mounted nor copied into the image"
        )


def test_compose_demo_reaches_the_sandbox_port(compose: dict[str, Any]) -> None:
    services = compose["services"]
    if "demo" not in services:
        pytest.skip("no demo service")
    sandbox_args = build_parser().parse_args(services["sandbox"]["command"])
    url = services["demo"]["environment"]["SYNCD_SANDBOX_URL"]
    assert url == f"http://sandbox:{sandbox_args.port}"
    assert sandbox_args.host == "0.0.0.0"
    for target, source in _volume_targets(services["demo"]).items():
        if source.startswith("./"):
            assert (REPO / source).is_file(), f"{source} (mounted at {target}) is missing"


def test_docker_compose_config_is_valid() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker CLI not installed")
    try:
        version = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"docker compose unavailable: {err}")
    if version.returncode != 0:
        pytest.skip("docker compose plugin not available")
    result = subprocess.run(
        [docker, "compose", "--profile", "demo", "config", "-q"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
