"""The registry of source types: one module per platform, listed explicitly."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field

from syncd.http import Auth, HttpClient, RequestLimiter, Unlimited
from syncd.records import Source
from syncd.settings import SourceSettings
from syncd.sources import caltopo, kartorium, katapult


@dataclass(frozen=True)
class SourceType:
    """How to build one platform's source from its settings."""

    settings: type[SourceSettings]
    create: Callable[[Any, HttpClient], Source]
    auth: Callable[[Any], Auth]
    limiter: Callable[[Any], RequestLimiter] = lambda _settings: Unlimited()


SOURCE_TYPES: dict[str, SourceType] = {
    "caltopo": SourceType(caltopo.CalTopoSettings, caltopo.CalTopoSource, caltopo.auth_for),
    "kartorium": SourceType(
        kartorium.KartoriumSettings, kartorium.KartoriumSource, kartorium.auth_for
    ),
    "katapult": SourceType(
        katapult.KatapultSettings, katapult.KatapultSource, katapult.auth_for, katapult.limiter_for
    ),
}

# The `[[sources]]` table, chosen by its `type` key.
SourceConfig = Annotated[
    caltopo.CalTopoSettings | kartorium.KartoriumSettings | katapult.KatapultSettings,
    Field(discriminator="type"),
]
