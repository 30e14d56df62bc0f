"""The full reliability sets run only when asked for (`-m reliability`).

Why: `make test` must stay fast; it runs each suite's small sample, while
`make test-reliability` selects the `reliability` marker and runs everything.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "reliability" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="full reliability set: make test-reliability")
    for item in items:
        if item.get_closest_marker("reliability"):
            item.add_marker(skip)
