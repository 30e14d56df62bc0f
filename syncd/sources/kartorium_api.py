"""Kartorium wire details: list envelopes and what 401/403 error bodies mean.

Kept apart from the source so the pass logic reads on its own. The page shows bare
JSON arrays; FACTS.md asks to accept `{"data": [...]}` too. A 403 carries
`missing_scope`; where the body puts the scope's name is not documented, so several
shapes are read.
"""

from __future__ import annotations

import re
from typing import Any

from syncd.errors import AuthError, ProtocolError

# Pagination is not documented; an envelope that hints at more pages must not be taken
# for a complete listing (it would tombstone everything on the later pages).
_PAGING_HINTS = ("next", "nextPage", "next_page", "hasMore", "has_more", "cursor")
_SCOPE_NAME = re.compile(r"\b[a-z]+:(?:read|write)\b")


def unwrap_list(body: Any, path: str) -> list[Any]:
    """A bare JSON array (the page's example) or `{"data": [...]}` (FACTS.md)."""
    if isinstance(body, list):
        return body
    if isinstance(body, dict) and isinstance(body.get("data"), list):
        data: list[Any] = body["data"]
        hints = [k for k in _PAGING_HINTS if body.get(k)]
        total = body.get("total")
        if hints or (isinstance(total, int) and total > len(data)):
            raise ProtocolError(f"{path}: listing looks paginated ({', '.join(hints) or 'total'})")
        return data
    raise ProtocolError(f"{path}: response is not a JSON array or {{'data': [...]}}")


def explain_auth(err: AuthError) -> AuthError:
    """401: the key is bad or expired. 403 `missing_scope`: name the scope the key lacks."""
    if err.status == 401:
        return AuthError(
            f"API key rejected (HTTP 401, missing, invalid or expired): {err.message}",
            url=err.url,
            status=401,
        )
    if err.status == 403:
        scope = missing_scope(err.payload, err.message)
        if scope is not None:
            return AuthError(
                f"API key lacks scope {scope} (HTTP 403 missing_scope) for {err.url}",
                url=err.url,
                status=403,
            )
    return err


def missing_scope(payload: object, message: str) -> str | None:
    """The scope a 403 body names, wherever the body puts it; else one named in the text."""
    candidates: list[Any] = []
    if isinstance(payload, dict):
        nested = payload.get("error")
        for container in (payload, nested if isinstance(nested, dict) else {}):
            for key in (
                "missing_scope",
                "missingScope",
                "required_scope",
                "requiredScope",
                "scope",
                "scopes",
                "missing_scopes",
            ):
                candidates.append(container.get(key))
        candidates += [payload.get("message"), payload.get("detail")]
    candidates.append(message)
    for value in candidates:
        values = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, str) and (found := _SCOPE_NAME.search(item)):
                return found.group(0)
    return None
