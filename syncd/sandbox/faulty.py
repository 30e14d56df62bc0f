"""Injected failures shared by every simulator: one per-route, per-request fault model.

Why: the reliability suite (issue 6) needs the same fault classes on every platform
(5xx, hangs past the client timeout, resets, truncated bodies, invalid JSON, valid JSON
of the wrong shape, 429 bursts, slow drips); each simulator only says how its own
error envelope looks.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from syncd.sandbox.caltopo import Fault

_CANNED = {"empty": b"", "invalid_json": b"{not json"}
_PARTIAL = b'{"status":"ok","timestamp":1,"result":{"features":['
_DRIP_CHUNK = 64


def pick(faults: list[Fault], path: str) -> Fault | None:
    """The first live fault whose `match` is in the path, with one use consumed."""
    fault = next((f for f in faults if f.match in path and f.times != 0), None)
    if fault is not None and fault.times > 0:
        fault.times -= 1
    return fault


async def respond(
    fault: Fault, request: web.Request, error: Callable[[Fault], web.Response]
) -> web.StreamResponse | None:
    """The faulty answer; None means answer normally (after a hang, or to drip it)."""
    transport = request.transport
    if fault.kind in ("hang", "drip"):
        if fault.kind == "hang":
            await asyncio.sleep(fault.delay)
        return None
    if fault.kind in _CANNED:
        return web.Response(body=_CANNED[fault.kind], content_type="application/json")
    if fault.kind == "json":  # valid JSON of the wrong shape
        return web.Response(body=json.dumps(fault.body), content_type="application/json")
    if fault.kind == "truncate":
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(_PARTIAL) + 4096
        await resp.prepare(request)
        await resp.write(_PARTIAL)
        if transport is not None:
            transport.close()  # close() flushes the partial body before the FIN
        return resp
    if fault.kind == "reset":
        if transport is not None:
            transport.abort()
        return web.Response(status=599)  # never reaches the client; aiohttp drops it quietly
    resp = error(fault)
    resp.headers.update(fault.headers)
    return resp


async def drip(request: web.Request, answer: web.Response, delay: float) -> web.StreamResponse:
    """Send a normal answer `_DRIP_CHUNK` bytes at a time, `delay` seconds apart."""
    body = answer.body if isinstance(answer.body, bytes) else b""
    resp = web.StreamResponse(status=answer.status, headers={"Content-Type": "application/json"})
    resp.content_length = len(body)
    await resp.prepare(request)
    for start in range(0, len(body), _DRIP_CHUNK):
        await resp.write(body[start : start + _DRIP_CHUNK])
        await asyncio.sleep(delay)
    await resp.write_eof()
    return resp


def answered_status(request: web.Request, response: web.StreamResponse) -> int:
    """The status a client saw, for a request log: 0 when a fault cut the connection."""
    transport = request.transport
    return 0 if transport is None or transport.is_closing() else response.status
