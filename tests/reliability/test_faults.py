"""Fault injection: every fault class on every platform ends in its documented outcome.

Why: a sync daemon meets 5xx, hangs, resets, cut bodies, junk JSON, revoked keys, 429
bursts and slow servers. The promise: transient faults are retried and the pass ends
`ok` with the mirror equal to the world; permanent ones mark the scope (or the source)
failed with one clear event and no traceback; nothing that still exists upstream is
tombstoned; the other platform's source syncs as if nothing happened; and once the
fault is gone the next pass converges.

Outcomes (the table in README "Reliability"):
- 500/502/503 once, 429 burst, hang past the timeout, reset, truncated body: retried
  (`http.retry`), run `ok`;
- slow drip within the timeout: run `ok`, no retry;
- 5xx forever, 400, invalid or empty JSON, JSON of the wrong shape: the scope fails
  (`scope.failed`), run `partial`;
- 401 after the credential is revoked: the source fails (`sync.failed`), no retry.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from syncd.config import load_config
from syncd.engine import Engine, RunOutcome
from syncd.mirror import Database
from syncd.sandbox.caltopo import Fault
from tests.conftest import Sandbox
from tests.reliability.harness import assert_matches_world, mirror_state, write_config
from tests.reliability.platforms import CALTOPO, KARTORIUM, KATAPULT, PLATFORMS, Platform
from tests.reliability.tally import record

TIMEOUT = 0.5  # the client timeout in these tests; a "hang" outlives it


@dataclass
class Case:
    """A fault on a platform's per-scope route and what must come of it."""

    id: str
    fault: Fault
    outcome: str  # ok | partial | failed
    retried: bool = False


TRANSIENT = [
    Case("500-once", Fault("", status=500), "ok", retried=True),
    Case("502-once", Fault("", status=502), "ok", retried=True),
    Case("503-once", Fault("", status=503), "ok", retried=True),
    Case("429-burst", Fault("", status=429, times=2, headers={"Retry-After": "0"}), "ok", True),
    Case("hang", Fault("", kind="hang", delay=TIMEOUT * 2), "ok", retried=True),
    Case("reset", Fault("", kind="reset", times=2), "ok", retried=True),
    Case("truncated", Fault("", kind="truncate"), "ok", retried=True),
    Case("slow-drip", Fault("", kind="drip", delay=0.002, times=-1), "ok"),
]
PERMANENT = [
    Case("503-forever", Fault("", status=503, times=-1), "partial", retried=True),
    Case("invalid-json", Fault("", kind="invalid_json", times=-1), "partial"),
    Case("empty-body", Fault("", kind="empty", times=-1), "partial"),
    Case("400", Fault("", status=400, times=-1), "partial"),
]
# Valid JSON of the wrong shape, per platform, on its per-scope route.
WRONG_SHAPES: dict[str, list[tuple[str, Any]]] = {
    CALTOPO.name: [
        ("no-features", {"status": "ok", "timestamp": 9, "result": {"timestamp": 9, "state": {}}}),
        (
            "features-object",
            {"status": "ok", "timestamp": 9, "result": {"timestamp": 9, "state": {"features": {}}}},
        ),
        (
            "ids-of-wrong-type",
            {
                "status": "ok",
                "timestamp": 9,
                "result": {"timestamp": 9, "state": {"features": []}, "ids": {"Marker": [1, 2]}},
            },
        ),
        (
            "ids-not-lists",
            {
                "status": "ok",
                "timestamp": 9,
                "result": {"timestamp": 9, "state": {"features": []}, "ids": {"Marker": "x"}},
            },
        ),
        ("array", [1, 2, 3]),
    ],
    KARTORIUM.name: [
        ("data-as-object", {"data": {"id": 1}}),
        ("object-not-list", {"scenes": []}),
        ("ids-of-wrong-type", [{"id": {"n": 1}, "name": "x", "projectID": 1}]),
        ("rows-not-objects", [1, "two", None]),
        ("string", "hello"),
    ],
    KATAPULT.name: [
        ("data-as-list", {"status": "success", "data": [], "meta": {}}),
        ("no-data", {"status": "success", "meta": {}}),
        ("error-envelope-on-200", {"status": "error", "message": "x", "type": "internal_error"}),
        ("array", [1, 2, 3]),
        ("string", "hello"),
    ],
}


def cases() -> list[Any]:
    out = []
    for platform in PLATFORMS:
        for case in [*TRANSIENT, *PERMANENT]:
            out.append(pytest.param(platform, case, id=f"{platform.name}-{case.id}"))
        for name, body in WRONG_SHAPES[platform.name]:
            case = Case(f"shape-{name}", Fault("", kind="json", body=body, times=-1), "partial")
            out.append(pytest.param(platform, case, id=f"{platform.name}-shape-{name}"))
    return out


class Setup:
    """The platform under test and a bystander synced to their first state, then changed."""

    def __init__(self, sandbox: Sandbox, tmp: Path, platforms: tuple[Platform, ...]) -> None:
        self.sandbox = sandbox
        self.platforms = platforms
        self.db_file = tmp / "mirror.db"
        config = write_config(
            tmp / "syncd.toml", self.db_file, sandbox.worlds, sandbox.url, platforms
        )
        loaded = load_config(str(config))
        self.settings = {s.name: s.model_copy(update={"timeout": TIMEOUT}) for s in loaded.sources}
        self.db = Database(loaded.database.url)

    async def sync(self) -> dict[str, RunOutcome]:
        """A pass of every source at once, as `syncd sync` does."""
        engine = Engine(self.db)
        outcomes = await asyncio.gather(*(engine.sync(s) for s in self.settings.values()))
        return {o.source: o for o in outcomes}


def other_than(platform: Platform) -> Platform:
    """The bystander that must sync as if nothing happened. Never Katapult unless under
    test: its real 50 ms pacing costs ~1.5 s a case, which the default suite cannot
    afford on every case of the other platforms."""
    return next(p for p in PLATFORMS if p is not platform and p is not KATAPULT)


@pytest.fixture
async def setup(sandbox: Sandbox, tmp_path: Path, platform: Platform) -> Any:
    involved = (platform, other_than(platform))
    for each in involved:
        each.build(sandbox.worlds)
    env = Setup(sandbox, tmp_path, involved)
    await env.db.upgrade()
    assert {o.status for o in (await env.sync()).values()} == {"ok"}
    for each in involved:
        each.mutate(sandbox.worlds)
    yield env
    await env.db.dispose()


def assert_nothing_live_tombstoned(state: dict[Any, Any], setup: Setup) -> None:
    """Never delete on partial knowledge: every tombstone is gone upstream too."""
    for platform in setup.platforms:
        expected = platform.expected(setup.sandbox.worlds)
        wrongly = [
            k
            for k, v in state.items()
            if k[0] == platform.name and not v["live"] and k[1:] in expected
        ]
        assert not wrongly, f"{platform.name}: tombstoned while still upstream: {wrongly}"


def clean_logs(logs: list[dict[str, Any]]) -> None:
    """No traceback and no internal error: every failure was understood."""
    assert not [e for e in logs if "exc_info" in e or "exception" in e], "a traceback was logged"
    assert not [e for e in logs if e["event"] == "sync.internal_error"]


@pytest.mark.parametrize(("platform", "case"), cases())
async def test_fault_has_its_documented_outcome(
    setup: Setup, platform: Platform, case: Case
) -> None:
    other = other_than(platform)
    scope = platform.one_scope(setup.sandbox.worlds)
    fault = dataclasses.replace(case.fault, match=scope)  # a copy: cases are shared
    platform.add_fault(setup.sandbox.worlds, fault)

    with capture_logs(processors=[merge_contextvars]) as logs:
        outcomes = await setup.sync()

    mine = outcomes[platform.name]
    assert mine.status == case.outcome, mine.error
    assert outcomes[other.name].status == "ok"
    clean_logs(logs)
    retries = [e for e in logs if e["event"] == "http.retry" and e.get("source") == platform.name]
    assert bool(retries) == case.retried
    state = mirror_state(setup.db_file)
    assert_nothing_live_tombstoned(state, setup)
    if case.outcome == "ok":
        assert_matches_world(state, setup.sandbox.worlds, setup.platforms)
    else:
        failed = [e for e in logs if e["event"] == "scope.failed" and e["source"] == platform.name]
        assert len(failed) == len(mine.failed_scopes) == 1
        assert all(e["error"] and "\n" not in e["error"] for e in failed)
        assert_matches_world(state, setup.sandbox.worlds, (other,))
        # The fault goes away: the next pass converges.
        fault.times = 0
        assert (await setup.sync())[platform.name].status == "ok"
        assert_matches_world(mirror_state(setup.db_file), setup.sandbox.worlds, setup.platforms)
    record("faults", cases=1)


@pytest.mark.parametrize("platform", PLATFORMS, ids=lambda p: p.name)
async def test_revoked_credential_fails_the_source_once_without_retry(
    setup: Setup, platform: Platform
) -> None:
    other = other_than(platform)
    platform.revoke(setup.sandbox.worlds)
    before = mirror_state(setup.db_file)

    with capture_logs(processors=[merge_contextvars]) as logs:
        outcomes = await setup.sync()

    assert outcomes[platform.name].status == "failed"
    assert "HTTP 401" in (outcomes[platform.name].error or "")
    assert outcomes[other.name].status == "ok"
    clean_logs(logs)
    mine = [e for e in logs if e.get("source") == platform.name]
    assert not [e for e in mine if e["event"] == "http.retry"]
    assert [e["event"] for e in mine if e["log_level"] in ("warning", "error")] == ["sync.failed"]
    state = mirror_state(setup.db_file)
    assert {k: v for k, v in state.items() if k[0] == platform.name} == {
        k: v for k, v in before.items() if k[0] == platform.name
    }
    assert_matches_world(state, setup.sandbox.worlds, (other,))
    record("faults", cases=1)
