"""A test hook: make the process SIGKILL itself at a deterministic point.

Why: the crash-consistency tests (tests/reliability/) must kill `syncd sync` at every
statement, commit and request of a pass, not only where a random delay happens to
land. Set, in the environment of the process under test:

    SYNCD_FAULT_KILL_AFTER="statements:N"   killed right after the N-th SQL statement ran
    SYNCD_FAULT_KILL_AFTER="commits:N"      killed just before the N-th COMMIT is sent
    SYNCD_FAULT_KILL_AFTER="requests:N"     killed just before the N-th HTTP request is sent

It is inert when the variable is unset (no event listener is even installed), and it
is a test hook, not a user option: it is not read from the config file.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from syncd.errors import ConfigError

ENV = "SYNCD_FAULT_KILL_AFTER"
KINDS = ("statements", "commits", "requests")


@dataclass
class KillSwitch:
    """Counts one kind of event and kills the process when the count reaches `after`."""

    kind: str
    after: int
    seen: int = 0

    def tick(self, kind: str) -> None:
        """Count one `kind` event; SIGKILL (no cleanup, no flush) on the chosen one."""
        if kind != self.kind:
            return
        self.seen += 1
        if self.seen >= self.after:
            os.kill(os.getpid(), signal.SIGKILL)


def parse(value: str) -> KillSwitch:
    """`KIND:N` with N >= 1; anything else is refused in one line."""
    kind, _, count = value.partition(":")
    if kind not in KINDS or not count.isdigit() or int(count) < 1:
        raise ConfigError(f"{ENV}: expected one of {', '.join(KINDS)} then ':N' (N >= 1)")
    return KillSwitch(kind, int(count))


_switch: KillSwitch | None = None
_loaded = False


def switch() -> KillSwitch | None:
    """The process's kill switch from the environment (read once), or None."""
    global _switch, _loaded  # noqa: PLW0603 - one switch per process, like the env it mirrors
    if not _loaded:
        value = os.environ.get(ENV, "").strip()
        _switch = parse(value) if value else None
        _loaded = True
    return _switch


def on_request() -> None:
    """Called by the HTTP client before each request leaves."""
    active = switch()
    if active is not None:
        active.tick("requests")


def install(engine: Engine) -> None:
    """Count statements and commits on `engine` when the hook is armed."""
    active = switch()
    if active is None or active.kind == "requests":
        return

    def after_execute(*_args: Any) -> None:
        active.tick("statements")

    def before_commit(_conn: Any) -> None:
        active.tick("commits")

    event.listen(engine, "after_cursor_execute", after_execute)
    event.listen(engine, "commit", before_commit)
