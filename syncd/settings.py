"""Config model bases shared by the top-level config and every source's own model."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr

from syncd.units import Duration


def _base_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    if "?" in value or "#" in value:
        # Paths are appended to it, and credentials never travel in it.
        raise ValueError("must not carry a query string or fragment")
    return value.rstrip("/")


BaseUrl = Annotated[str, AfterValidator(_base_url)]
"""An upstream API root, http(s) only, without trailing slash or query."""

SourceName = Annotated[str, Field(pattern=r"^[a-z0-9_-]+$", min_length=1, max_length=64)]


class StrictModel(BaseModel):
    """Refuses unknown keys: a typo in the config must not silently become a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file_secrets: ClassVar[frozenset[str]] = frozenset()
    """Keys that may instead be given as `<key>_file = "/run/secrets/..."`."""


class SourceSettings(StrictModel):
    """Options every source type has (ARCHITECTURE.md §4)."""

    name: SourceName
    type: str
    enabled: bool = True
    interval: Annotated[Duration, Field(ge=1)] = 60.0
    timeout: Annotated[Duration, Field(gt=0)] = 30.0
    max_retries: Annotated[int, Field(ge=0, le=20)] = 3
    retry_backoff: Duration = 1.0
    """First retry delay in seconds; doubles per attempt (with jitter), capped at 60 s."""
    concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    max_delete_fraction: Annotated[float, Field(ge=0, le=1)] = 0.5
    """A snapshot that would tombstone more than this share of its scope's live rows is held."""
    mass_delete_min_rows: Annotated[int, Field(ge=0)] = 10
    """The mass-delete guard only holds snapshots that tombstone more rows than this."""
    allow_mass_delete: bool = False

    def secret_values(self) -> list[str]:
        """Every secret this source holds, for redaction."""
        return [
            value.get_secret_value()
            for value in self.__dict__.values()
            if isinstance(value, SecretStr)
        ]
