"""Config loading: every mistake is one clear line naming the file and key, never a traceback.

Why: the config is the operator's only interface (ARCHITECTURE.md §4). A typo must stop
syncd at start-up with a message that says where and what, `${ENV}` and `*_file`
secrets must resolve as documented, the shipped example configs must keep loading,
and secret values must be registered for redaction and never echoed in an error.
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from typing import Any

import pytest

from syncd.config import DEFAULT_PATH, Config, config_path, load_config, parse_config
from syncd.errors import ConfigError
from syncd.redact import redact_text
from syncd.units import parse_duration

FILE = Path("syncd.toml")
REPO = Path(__file__).resolve().parents[2]
SECRET = "c2VjcmV0LXNlY3JldA=="  # base64("secret-secret")


def source(**overrides: Any) -> dict[str, Any]:
    """A valid CalTopo source table, with some keys replaced (None removes a key)."""
    table: dict[str, Any] = {
        "name": "sar",
        "type": "caltopo",
        "team_id": "ABC123",
        "credential_id": "CRED01",
        "credential_secret": SECRET,
    }
    table.update(overrides)
    return {k: v for k, v in table.items() if v is not None}


def parse(raw: dict[str, Any], environ: dict[str, str] | None = None) -> Config:
    return parse_config(raw, file=FILE, environ=environ or {})


def fresh_secret() -> str:
    """A base64 secret no other test has registered for redaction."""
    return base64.b64encode(os.urandom(18)).decode()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- malformed configurations ----------------------------------------------------------

MALFORMED = [
    pytest.param({"sourcez": []}, {}, "sourcez", "unknown key", id="unknown-top-level-key"),
    pytest.param(
        {"logging": {"colour": "red"}}, {}, "logging.colour", "unknown key", id="unknown-table-key"
    ),
    pytest.param(
        {"sources": [source(tema_id="X")]},
        {},
        "sources[0].tema_id",
        "unknown key",
        id="unknown-source-key",
    ),
    pytest.param(
        {"sources": [source(team_id=None)]},
        {},
        "sources[0].team_id",
        "missing required key",
        id="missing-team-id",
    ),
    pytest.param(
        {"sources": [source(type=None)]},
        {},
        "sources[0].type",
        "missing required key",
        id="missing-type",
    ),
    pytest.param(
        {"sources": [source(type="arcgis")]},
        {},
        "sources[0].type",
        "unknown source type 'arcgis'",
        id="unknown-source-type",
    ),
    pytest.param(
        {"sources": [source(type=["caltopo"])]},
        {},
        "sources[0].type",
        "caltopo",
        id="source-type-not-a-string",
    ),
    pytest.param(
        {"sources": {"name": "sar"}}, {}, "sources", "valid list", id="sources-not-an-array"
    ),
    pytest.param(
        {"sources": [source(interval=[1])]},
        {},
        "sources[0].interval",
        "is not a duration",
        id="interval-wrong-type",
    ),
    pytest.param(
        {"sources": [source(interval="5 parsecs")]},
        {},
        "sources[0].interval",
        "'5 parsecs' is not a duration",
        id="bad-duration-string",
    ),
    pytest.param(
        {"sources": [source(interval=0)]},
        {},
        "sources[0].interval",
        "greater than or equal to 1",
        id="zero-interval",
    ),
    pytest.param(
        {"sources": [source(interval=-5)]},
        {},
        "sources[0].interval",
        "not a non-negative duration",
        id="negative-interval",
    ),
    pytest.param(
        {"sources": [source(interval="-5s")]},
        {},
        "sources[0].interval",
        "is not a duration",
        id="negative-interval-string",
    ),
    pytest.param(
        {"sources": [source(timeout="0s")]},
        {},
        "sources[0].timeout",
        "greater than 0",
        id="zero-timeout",
    ),
    pytest.param(
        {"sources": [source(max_retries="three")]},
        {},
        "sources[0].max_retries",
        "valid integer",
        id="max-retries-not-int",
    ),
    pytest.param(
        {"sources": [source(), source(team_id="DEF456")]},
        {},
        "sources[1].name",
        "duplicate source name 'sar'",
        id="duplicate-name",
    ),
    pytest.param(
        {"sources": [source(name="Bad Name")]},
        {},
        "sources[0].name",
        "should match pattern",
        id="bad-name-pattern",
    ),
    pytest.param(
        {"sources": [source(credential_id="${CALTOPO_ID}")]},
        {"OTHER": "x"},
        "sources[0].credential_id",
        "environment variable CALTOPO_ID is not set",
        id="unset-env-var",
    ),
    pytest.param(
        {"database": {"url": "${DB_URL}"}},
        {},
        "database.url",
        "environment variable DB_URL is not set",
        id="unset-env-var-top-level",
    ),
    pytest.param(
        {"sources": [source(credential_secret="not base64!")]},
        {},
        "sources[0].credential_secret",
        "must be the base64 secret",
        id="secret-not-base64",
    ),
    pytest.param(
        {"sources": [source(credential_secret_file="secret.txt")]},
        {},
        "sources[0]",
        "give either credential_secret or credential_secret_file, not both",
        id="secret-and-secret-file",
    ),
    pytest.param(
        {
            "sources": [
                source(
                    credential_secret=None,
                    credential_secret_file="/nonexistent-syncd-test/caltopo_secret",
                )
            ]
        },
        {},
        "sources[0].credential_secret_file",
        "cannot read /nonexistent-syncd-test/caltopo_secret",
        id="secret-file-unreadable",
    ),
    pytest.param(
        {"sources": [source(base_url="ftp://caltopo.com")]},
        {},
        "sources[0].base_url",
        "must start with http:// or https://",
        id="bad-base-url",
    ),
    pytest.param(
        {"logging": {"level": "loud"}},
        {},
        "logging.level",
        "'debug', 'info', 'warning' or 'error'",
        id="bad-logging-level",
    ),
    pytest.param(
        {"database": {"url": "mysql://db/syncd"}},
        {},
        "database.url",
        "must be a sqlite:/// or postgresql:// URL",
        id="bad-database-url",
    ),
    pytest.param(
        {"server": {"port": 70000}},
        {},
        "server.port",
        "less than or equal to 65535",
        id="port-out-of-range",
    ),
]


@pytest.mark.parametrize(("raw", "environ", "key", "what"), MALFORMED)
def test_malformed_config_is_one_line_naming_file_key_and_problem(
    raw: dict[str, Any], environ: dict[str, str], key: str, what: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(raw, environ)
    message = caught.value.message
    assert "\n" not in message
    assert message.startswith(f"{FILE}: {key}")
    assert what in message
    assert "Traceback" not in message


def test_several_mistakes_give_one_line_each() -> None:
    raw = {"logging": {"level": "loud"}, "sources": [source(team_id=None, colour="red")]}
    with pytest.raises(ConfigError) as caught:
        parse(raw)
    lines = caught.value.message.splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{FILE}: ") for line in lines)
    joined = "\n".join(lines)
    for key in ("logging.level", "sources[0].team_id", "sources[0].colour"):
        assert key in joined


@pytest.mark.parametrize(
    ("text", "what"),
    [
        pytest.param("[logging\nlevel = 'info'\n", "invalid TOML", id="unclosed-table"),
        pytest.param("level = \n", "invalid TOML", id="missing-value"),
        pytest.param(b"\xff\xfe[logging]", "cannot read config file", id="not-utf8"),
    ],
)
def test_unparseable_file_is_one_line_naming_the_file(
    tmp_path: Path, text: str | bytes, what: str
) -> None:
    path = tmp_path / "syncd.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = caught.value.message
    assert "\n" not in message
    assert message.startswith(f"{path}: {what}")


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "syncd.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.message == f"{path}: config file not found"


def test_load_config_reports_the_file_it_read(tmp_path: Path) -> None:
    path = write(tmp_path / "conf" / "mine.toml", '[logging]\nlevel = "loud"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.message.startswith(f"{path}: logging.level: ")


# --- interpolation and secret files ----------------------------------------------------


@pytest.mark.parametrize(
    ("value", "environ", "expected"),
    [
        pytest.param("${CID}", {"CID": "cred-7"}, "cred-7", id="var"),
        pytest.param("pre-${CID}-post", {"CID": "x"}, "pre-x-post", id="embedded"),
        pytest.param("${A}${B}", {"A": "1", "B": "2"}, "12", id="two-vars"),
        pytest.param("${CID:-fallback}", {}, "fallback", id="default-when-unset"),
        pytest.param("${CID:-fallback}", {"CID": "set"}, "set", id="default-ignored-when-set"),
        pytest.param("${CID:-}", {}, "", id="empty-default"),
        pytest.param("pa$$word", {}, "pa$word", id="dollar-dollar"),
        pytest.param("$${CID}", {"CID": "no"}, "${CID}", id="escaped-reference"),
        pytest.param("$CID", {"CID": "no"}, "$CID", id="bare-dollar-untouched"),
        pytest.param(
            "${CID:-fallback}",
            {"CID": ""},
            "fallback",
            id="default-when-empty",
        ),
    ],
)
def test_environment_interpolation(value: str, environ: dict[str, str], expected: str) -> None:
    raw = {"database": {"url": f"sqlite:///{value}"}}
    assert parse(raw, environ).database.url == f"sqlite:///{expected}"


def test_interpolation_reaches_source_values() -> None:
    raw = {"sources": [source(credential_id="${CID}", credential_secret="${SECRET}")]}
    config = parse(raw, {"CID": "from-env", "SECRET": SECRET})
    (settings,) = config.sources
    assert settings.credential_id == "from-env"
    assert settings.credential_secret.get_secret_value() == SECRET


def test_secret_file_is_read_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = fresh_secret()
    write(tmp_path / "etc" / "secrets" / "caltopo", f"{secret}\n")
    path = write(
        tmp_path / "etc" / "syncd.toml",
        "[[sources]]\n"
        'name = "sar"\ntype = "caltopo"\nteam_id = "ABC123"\ncredential_id = "C1"\n'
        'credential_secret_file = "secrets/caltopo"\n',
    )
    monkeypatch.chdir(tmp_path)  # not the config's directory
    (settings,) = load_config(path).sources
    assert settings.credential_secret.get_secret_value() == secret


def test_absolute_secret_file_and_database_url_file(tmp_path: Path) -> None:
    secret_file = write(tmp_path / "abs" / "secret", f"{SECRET}\n")
    write(tmp_path / "db_url", "sqlite+aiosqlite:///tmp/x.db\n")
    raw = {
        "database": {"url_file": "db_url"},
        "sources": [source(credential_secret=None, credential_secret_file=str(secret_file))],
    }
    config = parse_config(raw, file=tmp_path / "syncd.toml", environ={})
    assert config.database.url == "sqlite+aiosqlite:///tmp/x.db"
    assert config.sources[0].credential_secret.get_secret_value() == SECRET


# --- durations -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("90s", 90.0),
        ("15m", 900.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        (" 2m ", 120.0),
        ("1.5h", 5400.0),
        ("30", 30.0),
        (45, 45.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["5 parsecs", "1w", "h", "", "-1s", True, None, [1], "1e3"])
def test_parse_duration_refuses(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("key", "value", "seconds"),
    [
        ("interval", "90s", 90.0),
        ("interval", "15m", 900.0),
        ("interval", "1h", 3600.0),
        ("interval", 120, 120.0),
        ("timeout", "500ms", 0.5),
        ("retry_backoff", "250ms", 0.25),
        ("overlap", 2, 2.0),
    ],
)
def test_durations_in_a_source(key: str, value: object, seconds: float) -> None:
    (settings,) = parse({"sources": [source(**{key: value})]}).sources
    assert getattr(settings, key) == seconds


# --- which file, and the shipped examples ----------------------------------------------


@pytest.mark.parametrize(
    ("explicit", "env", "expected"),
    [
        ("given.toml", "/etc/syncd/env.toml", Path("given.toml")),
        (None, "/etc/syncd/env.toml", Path("/etc/syncd/env.toml")),
        (None, None, DEFAULT_PATH),
        (None, "", DEFAULT_PATH),
    ],
)
def test_config_path_choice(
    monkeypatch: pytest.MonkeyPatch, explicit: str | None, env: str | None, expected: Path
) -> None:
    if env is None:
        monkeypatch.delenv("SYNCD_CONFIG", raising=False)
    else:
        monkeypatch.setenv("SYNCD_CONFIG", env)
    assert config_path(explicit) == expected


def test_default_config_path() -> None:
    assert Path("config/syncd.toml") == DEFAULT_PATH


def test_load_config_uses_syncd_config_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "env.toml", '[logging]\nlevel = "debug"\n')
    monkeypatch.setenv("SYNCD_CONFIG", str(path))
    assert load_config().logging.level == "debug"


def test_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = fresh_secret()
    example = REPO / "config" / "syncd.example.toml"
    # Every platform's example source reads its credentials from the environment.
    for name in re.findall(r"\$\{([A-Z0-9_]+)\}", example.read_text()):
        monkeypatch.setenv(name, fresh_secret())
    monkeypatch.setenv("CALTOPO_CREDENTIAL_ID", "EXAMPLECRED")
    monkeypatch.setenv("CALTOPO_CREDENTIAL_SECRET", secret)
    config = load_config(example)
    assert len(config.sources) >= 2
    settings = config.source("sar-team")
    assert settings.type == "caltopo"
    assert settings.interval == 60.0
    assert settings.credential_id == "EXAMPLECRED"
    assert settings.credential_secret.get_secret_value() == secret
    assert config.server.port == 8080


def test_example_config_needs_its_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CALTOPO_CREDENTIAL_ID", raising=False)
    monkeypatch.setenv("CALTOPO_CREDENTIAL_SECRET", SECRET)
    with pytest.raises(ConfigError, match=r"sources\[0\]\.credential_id: environment variable"):
        load_config(REPO / "config" / "syncd.example.toml")


@pytest.mark.parametrize(
    ("sandbox_url", "base_url"),
    [
        (None, "http://127.0.0.1:8089/caltopo"),
        ("http://sandbox:8089", "http://sandbox:8089/caltopo"),
    ],
)
def test_demo_config_loads(
    monkeypatch: pytest.MonkeyPatch, sandbox_url: str | None, base_url: str
) -> None:
    if sandbox_url is None:
        monkeypatch.delenv("SYNCD_SANDBOX_URL", raising=False)
    else:
        monkeypatch.setenv("SYNCD_SANDBOX_URL", sandbox_url)
    config = load_config(REPO / "config" / "demo.toml")
    settings = config.source("sar-team")
    assert settings.base_url == base_url
    root = base_url.removesuffix("/caltopo")
    assert all(s.base_url.startswith(root) for s in config.sources)  # type: ignore[attr-defined]
    assert settings.interval == 10.0
    assert config.logging.format == "auto"


# --- secrets ---------------------------------------------------------------------------


def test_loaded_secrets_are_registered_for_redaction(tmp_path: Path) -> None:
    secret, password = fresh_secret(), f"pw{os.urandom(6).hex()}"
    assert redact_text(f"x {secret}") == f"x {secret}"  # not known before loading
    path = write(
        tmp_path / "syncd.toml",
        f'[database]\nurl = "postgresql://syncd:{password}@db/syncd"\n'
        "[[sources]]\n"
        'name = "sar"\ntype = "caltopo"\nteam_id = "ABC123"\ncredential_id = "C1"\n'
        f'credential_secret = "{secret}"\n',
    )
    load_config(path)
    assert redact_text(f"x {secret}") == "x ***"
    assert redact_text(f"login failed: {password}") == "login failed: ***"


def test_a_refused_config_registers_no_secrets() -> None:
    secret = fresh_secret()
    with pytest.raises(ConfigError):
        parse({"sources": [source(credential_secret=secret, interval=0)]})
    assert redact_text(secret) == secret


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param({"sources": [source(credential_secret=907123456789)]}, id="int"),
        pytest.param({"sources": [source(credential_secret=["LEAKME-SECRET-1"])]}, id="list"),
        pytest.param({"sources": [source(credential_secret={"v": "LEAKME-SECRET-1"})]}, id="table"),
        pytest.param({"sources": [source(credential_secret="LEAKME-SECRET-1!")]}, id="not-base64"),
        pytest.param(
            {"sources": [source(credential_secret="LEAKME-SECRET-1!", name="Bad Name")]},
            id="two-errors",
        ),
        pytest.param({"database": {"url": "mysql://u:LEAKME-SECRET-1@db/x"}}, id="db-password"),
    ],
)
def test_error_for_a_bad_secret_never_contains_its_value(raw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(raw)
    message = f"{caught.value}\n{caught.value!r}"
    assert "LEAKME" not in message
    assert "907123456789" not in message
    assert "credential_secret" in message or "database.url" in message


@pytest.mark.parametrize(
    "table",
    [
        {"type": "caltopo", "team_id": "T1", "credential_id": "c", "credential_secret": "eHg="},
        {"type": "kartorium", "api_key": "karta_live_x"},
        {"type": "katapult", "api_key": "k"},
    ],
    ids=lambda t: t["type"],
)
def test_every_source_type_refuses_a_base_url_with_a_query(table: dict[str, str]) -> None:
    raw = {"sources": [{"name": "s", "base_url": "https://example.test/api?api_key=x", **table}]}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, file=Path("syncd.toml"), environ={})
    assert str(err.value) == (
        "syncd.toml: sources[0].base_url: must not carry a query string or fragment"
    )
