"""Counts from a reliability run, for the README's table (`make test-reliability`).

When SYNCD_RELIABILITY_REPORT names a file, each suite merges its counts into that
JSON object under its own key; otherwise recording is a no-op.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path


def record(key: str, **counts: int) -> None:
    """Merge `counts` under `key` in the report file (locked: suites may run at once)."""
    target = os.environ.get("SYNCD_RELIABILITY_REPORT")
    if not target:
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        text = handle.read()
        data = json.loads(text) if text.strip() else {}
        merged = data.get(key, {})
        for name, value in counts.items():
            merged[name] = merged.get(name, 0) + value if isinstance(value, int) else value
        data[key] = merged
        handle.seek(0)
        handle.truncate()
        json.dump(data, handle, indent=2, sort_keys=True)
