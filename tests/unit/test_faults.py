"""The crash hook (syncd/faults.py): parsed strictly, inert when unset, kills on the N-th.

Why: the crash-consistency suite relies on the hook killing at exactly the point it
names; a typo in it must fail loudly instead of silently never killing.
"""

from __future__ import annotations

import asyncio
import sys

import pytest

from syncd import faults
from syncd.errors import ConfigError


@pytest.mark.parametrize(
    "value", ["statements", "statements:", "statements:0", "bytes:3", "requests:-1", ":4"]
)
def test_bad_values_are_refused_in_one_line(value: str) -> None:
    with pytest.raises(ConfigError, match=r"SYNCD_FAULT_KILL_AFTER: expected one of"):
        faults.parse(value)


def test_switch_counts_only_its_kind() -> None:
    switch = faults.parse("commits:3")
    switch.tick("statements")
    switch.tick("commits")
    switch.tick("commits")
    assert (switch.kind, switch.after, switch.seen) == ("commits", 3, 2)


async def test_unset_hook_is_inert_and_armed_hook_kills() -> None:
    script = (
        "import asyncio\n"
        "from syncd.mirror import Database\n"
        "async def main():\n"
        "    db = Database('sqlite+aiosqlite:///:memory:')\n"
        "    async with db.write() as conn:\n"
        "        await conn.exec_driver_sql('SELECT 1')\n"
        "    await db.dispose()\n"
        "    print('survived')\n"
        "asyncio.run(main())\n"
    )
    for env, code, out in (({}, 0, "survived"), ({faults.ENV: "commits:1"}, -9, "")):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, env=env, stdout=asyncio.subprocess.PIPE
        )
        stdout, _ = await process.communicate()
        assert (process.returncode, stdout.decode().strip()) == (code, out)
