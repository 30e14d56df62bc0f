"""The mirror-versus-model property (test_mirror_properties.py) run long, for
`make test-reliability`: more examples and longer snapshot sequences.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd.records import Snapshot
from tests.reliability.tally import record
from tests.reliability.test_mirror_properties import _check, snapshots

EXAMPLES = 1500
_seen = [0]


@pytest.fixture(scope="module", autouse=True)
def _tally() -> Iterator[None]:
    yield
    if _seen[0]:
        record("hypothesis", examples=_seen[0])


@pytest.mark.reliability
@pytest.mark.timeout(900)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(snapshots(), min_size=1, max_size=16))
def test_mirror_matches_model_long(sequence: list[Snapshot]) -> None:
    _seen[0] += 1
    asyncio.run(_check(sequence))
