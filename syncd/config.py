"""Load and validate the TOML config: `${ENV}` interpolation, `*_file` secrets, typed models.

Every mistake becomes a `ConfigError` whose lines each name the file and the key,
never a traceback (ARCHITECTURE.md §4).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from syncd import redact
from syncd.errors import ConfigError
from syncd.settings import SourceSettings, StrictModel
from syncd.sources import SOURCE_TYPES, SourceConfig
from syncd.units import Duration

DEFAULT_PATH = Path("config/syncd.toml")
_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class DatabaseConfig(StrictModel):
    """Where the mirror lives."""

    file_secrets = frozenset({"url"})

    url: str = "sqlite+aiosqlite:///data/syncd.db"
    busy_timeout: Annotated[float, Field(gt=0)] = 30.0
    """Seconds a SQLite writer waits for another writer's lock before failing."""

    @field_validator("url")
    @classmethod
    def _known_backend(cls, url: str) -> str:
        if not url.startswith(("sqlite", "postgresql", "postgres://")):
            raise ValueError("must be a sqlite:/// or postgresql:// URL")
        return url


class LoggingConfig(StrictModel):
    """How log events are written."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console", "auto"] = "json"


class ServerConfig(StrictModel):
    """The health, readiness, metrics and status server of `syncd run`."""

    enabled: bool = True
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080


class DaemonConfig(StrictModel):
    """How `syncd run` schedules sources and shuts down."""

    shutdown_grace: Duration = 20.0
    """Seconds SIGTERM waits for in-flight syncs before cancelling them (exit 1)."""
    max_backoff: Annotated[Duration, Field(gt=0)] = 900.0
    """Cap of the delay before retrying a source that keeps failing (doubles per failure)."""


class Config(StrictModel):
    """The whole config file."""

    database: DatabaseConfig = DatabaseConfig()
    logging: LoggingConfig = LoggingConfig()
    server: ServerConfig = ServerConfig()
    daemon: DaemonConfig = DaemonConfig()
    sources: list[SourceConfig] = []

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        seen: set[str] = set()
        for index, source in enumerate(self.sources):
            if source.name in seen:
                raise ValueError(f"sources[{index}].name: duplicate source name {source.name!r}")
            seen.add(source.name)
        return self

    def source(self, name: str) -> SourceSettings:
        """The source called `name`, or a ConfigError naming the ones that exist."""
        for source in self.sources:
            if source.name == name:
                return source
        known = ", ".join(s.name for s in self.sources) or "none"
        raise ConfigError(f"no source named {name!r} (configured: {known})")


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config file to use: the flag, else $SYNCD_CONFIG, else config/syncd.toml."""
    return Path(explicit or os.environ.get("SYNCD_CONFIG") or DEFAULT_PATH)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read, interpolate and validate the config file; raise ConfigError on any mistake."""
    file = config_path(path)
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{file}: cannot read config file: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{file}: invalid TOML: {err}") from None
    return parse_config(raw, file=file, environ=os.environ)


def parse_config(raw: Mapping[str, Any], *, file: Path, environ: Mapping[str, str]) -> Config:
    """Validate an already-parsed TOML document (separate for tests)."""
    resolved = _interpolate(dict(raw), "", file, environ)
    _resolve_secret_files(resolved, file)
    try:
        config = Config.model_validate(resolved)
    except ValidationError as err:
        raise ConfigError(
            "\n".join(f"{file}: {_describe(detail, resolved)}" for detail in err.errors())
        ) from None
    redact.register_secrets(_secret_values(config))
    return config


def _interpolate(value: Any, where: str, file: Path, environ: Mapping[str, str]) -> Any:
    """Replace `${NAME}` (or `${NAME:-default}`) in every string; `$$` is a literal `$`."""
    if isinstance(value, dict):
        return {k: _interpolate(v, _join(where, k), file, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{where}[{i}]", file, environ) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name is None:
            return "$"
        if not environ.get(name) and default is not None:  # as in sh: unset or empty
            return default
        if name not in environ:
            raise ConfigError(f"{file}: {where}: environment variable {name} is not set")
        return environ[name]

    return _ENV_REF.sub(substitute, value)


def _resolve_secret_files(raw: dict[str, Any], file: Path) -> None:
    """Turn `<key>_file = PATH` into `<key> = <file contents>` for secret keys."""
    tables: list[tuple[str, Any, type[StrictModel] | None]] = [
        ("database", raw.get("database"), DatabaseConfig)
    ]
    sources = raw.get("sources")
    if isinstance(sources, list):
        for index, table in enumerate(sources):
            kind = table.get("type") if isinstance(table, dict) else None
            model: type[StrictModel] | None = (
                SOURCE_TYPES[kind].settings
                if isinstance(kind, str) and kind in SOURCE_TYPES
                else None
            )
            tables.append((f"sources[{index}]", table, model))
    for where, table, model in tables:
        if not isinstance(table, dict) or model is None:
            continue
        for key in model.file_secrets:
            file_key = f"{key}_file"
            if file_key not in table:
                continue
            if key in table:
                raise ConfigError(f"{file}: {where}: give either {key} or {file_key}, not both")
            secret_path = Path(str(table.pop(file_key)))
            if not secret_path.is_absolute():
                secret_path = file.parent / secret_path
            try:
                table[key] = secret_path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as err:
                reason = getattr(err, "strerror", None) or "not UTF-8 text"
                raise ConfigError(
                    f"{file}: {where}.{file_key}: cannot read {secret_path}: {reason}"
                ) from None


def _describe(detail: ErrorDetails, raw: Mapping[str, Any]) -> str:
    """One line naming the key and what is wrong with it."""
    loc = list(detail["loc"])
    if len(loc) >= 3 and loc[0] == "sources" and isinstance(loc[1], int):
        del loc[2]  # the discriminator tag pydantic inserts: sources.1.caltopo.x
    key = _loc_text(loc)
    kind = detail["type"]
    if kind == "missing":
        return f"{key}: missing required key"
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "union_tag_not_found":
        return f"{key}.type: missing required key (one of: {', '.join(SOURCE_TYPES)})"
    if kind == "union_tag_invalid":
        tag = detail.get("ctx", {}).get("tag")
        return f"{key}.type: unknown source type {tag!r} (one of: {', '.join(SOURCE_TYPES)})"
    message = detail["msg"].removeprefix("Value error, ")
    if message.startswith("sources["):  # raised by a model validator with its own key
        return message
    return f"{key}: {message}"


def _loc_text(loc: list[int | str]) -> str:
    text = ""
    for part in loc:
        text = f"{text}[{part}]" if isinstance(part, int) else _join(text, part)
    return text or "(top level)"


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _secret_values(config: Config) -> list[str]:
    values = [value for source in config.sources for value in source.secret_values()]
    password = re.search(r"://[^/:@]+:([^@/]+)@", config.database.url)
    if password:
        values.append(password.group(1))
    return values
