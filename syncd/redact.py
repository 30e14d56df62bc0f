"""Keeps secrets out of every log line, error message and URL syncd shows.

Two layers: URL query parameters and headers that carry credentials are masked by
name wherever they appear in text, and every secret value loaded from the config is
registered so that it is masked verbatim wherever it turns up.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"

SECRET_PARAMS = frozenset(
    {"signature", "api_key", "apikey", "key", "token", "access_token", "password", "secret"}
)

# A credential parameter anywhere in text: in a URL, or echoed in an upstream's prose.
_PARAM_IN_TEXT = re.compile(
    r"(?i)((?<![A-Za-z0-9_])(?:" + "|".join(sorted(SECRET_PARAMS)) + r")=)[^&\s\"'<>]+"
)
_AUTH_HEADER = re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)(?:\w+\s+)?[^\s\"',}]+")
_URL_PASSWORD = re.compile(r"(://[^/\s:@]+:)[^@\s/]+@")

_registered: set[str] = set()


def register_secrets(values: Iterable[str]) -> None:
    """Mask these exact values everywhere from now on (short values would mask noise)."""
    _registered.update(v for v in values if v and len(v) >= 6)


def redact_text(text: str) -> str:
    """Mask credentials in free text: known secrets, secret query params, auth headers."""
    for secret in _registered:
        if secret in text:
            text = text.replace(secret, MASK)
    text = _PARAM_IN_TEXT.sub(rf"\g<1>{MASK}", text)
    text = _AUTH_HEADER.sub(rf"\g<1>{MASK}", text)
    return _URL_PASSWORD.sub(rf"\g<1>{MASK}@", text)


def redact_url(url: str) -> str:
    """Return the URL with every credential-bearing query parameter masked."""
    parts = urlsplit(url)
    if parts.query:
        query = [
            (k, MASK if k.lower() in SECRET_PARAMS else v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return redact_text(urlunsplit(parts))


def redact_value(value: Any) -> Any:
    """Redact strings inside nested dicts, lists and tuples (log event values)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_value(v) for v in value)
    return value
