"""Durations as users write them in the config: seconds, or "500ms", "90s", "15m", "1h"."""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BeforeValidator

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """Return seconds; refuse anything that is not a finite, non-negative duration."""
    if isinstance(value, bool):
        raise ValueError('expected a duration such as 60, "90s", "15m" or "1h"')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _FACTORS[match.group(2) or "s"]
    else:
        raise ValueError(f'{value!r} is not a duration such as 60, "90s", "15m" or "1h"')
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} is not a non-negative duration")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A config field in seconds that also accepts "90s"/"15m"/"1h"/"500ms"."""
