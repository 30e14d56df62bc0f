"""Redaction: credentials are masked in URLs, free text, log values and rendered log lines.

Why: ARCHITECTURE.md §7 promises that API keys, credential secrets, signatures and
`Authorization` headers never appear in any log line or error message. These tests pin
each masking layer and the logging pipeline that applies it last, after tracebacks
are formatted.
"""

from __future__ import annotations

import io
import json
import logging
import os
from datetime import datetime

import pytest
import structlog

from syncd.logging import configure_logging, redact_event
from syncd.redact import MASK, redact_text, redact_url, redact_value, register_secrets


def fresh_secret(prefix: str = "reg") -> str:
    """A value no other test has registered."""
    return f"{prefix}-{os.urandom(8).hex()}"


# --- URLs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param(
            "https://caltopo.com/api/v1/acct/T1/since/0?id=CRED&expires=171&signature=abc%2B%3D",
            "https://caltopo.com/api/v1/acct/T1/since/0?id=CRED&expires=171&signature=***",
            id="signature",
        ),
        pytest.param(
            "https://k.test/api/v3/jobs?api_key=K123&page=2",
            "https://k.test/api/v3/jobs?api_key=***&page=2",
            id="api_key",
        ),
        pytest.param("https://x.test/a?token=T&q=1", "https://x.test/a?token=***&q=1", id="token"),
        pytest.param("https://x.test/a?key=K&q=1", "https://x.test/a?key=***&q=1", id="key"),
        pytest.param("https://x.test/a?apikey=K", "https://x.test/a?apikey=***", id="apikey"),
        pytest.param(
            "https://x.test/a?access_token=A&password=P&secret=S",
            "https://x.test/a?access_token=***&password=***&secret=***",
            id="other-secret-names",
        ),
        pytest.param(
            "https://x.test/a?API_KEY=K&Signature=S",
            "https://x.test/a?API_KEY=***&Signature=***",
            id="case-insensitive",
        ),
        pytest.param(
            "https://x.test/a?monkey=banana&keyring=1&tokens=2",
            "https://x.test/a?monkey=banana&keyring=1&tokens=2",
            id="similar-names-kept",
        ),
        pytest.param("https://x.test/a/b", "https://x.test/a/b", id="no-query"),
        pytest.param(
            "https://user:hunter22@x.test/a?q=1",
            "https://user:***@x.test/a?q=1",
            id="userinfo-password",
        ),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_url_masks_every_repeat_of_a_parameter() -> None:
    shown = redact_url("https://x.test/a?key=one111&key=two222&page=3")
    assert "one111" not in shown
    assert "two222" not in shown
    assert shown.count(MASK) == 2
    assert "page=3" in shown


# --- free text -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("Authorization: Bearer abc.def.ghi", "Authorization: ***", id="header-bearer"),
        pytest.param("authorization=Basic dXNlcjpw", "authorization=***", id="header-basic"),
        pytest.param(
            '{"Authorization": "Bearer abc", "Accept": "json"}',
            '{"Authorization": "***", "Accept": "json"}',
            id="header-in-json",
        ),
        pytest.param(
            "headers={'authorization': 'Token t0k3n', 'x': 1}",
            "headers={'authorization': '***', 'x': 1}",
            id="header-in-repr",
        ),
        pytest.param(
            "connect to postgresql://syncd:hunter22@db:5432/syncd failed",
            "connect to postgresql://syncd:***@db:5432/syncd failed",
            id="url-password",
        ),
        pytest.param(
            "GET https://h.test/p?id=1&signature=ab+/c= -> 401",
            "GET https://h.test/p?id=1&signature=*** -> 401",
            id="param-in-text",
        ),
        pytest.param("nothing secret here: 200 OK", "nothing secret here: 200 OK", id="clean"),
        pytest.param(
            "invalid api_key=K3Y-abcdef",
            "invalid api_key=***",
            id="bare-param",
        ),
    ],
)
def test_redact_text(text: str, expected: str) -> None:
    assert redact_text(text) == expected


def test_registered_secret_is_masked_wherever_it_appears() -> None:
    secret = fresh_secret()
    text = f"failed with {secret}; retry ({secret}) x{secret}y"
    assert redact_text(text) == text  # not yet registered
    register_secrets([secret])
    shown = redact_text(text)
    assert secret not in shown
    assert shown == f"failed with {MASK}; retry ({MASK}) x{MASK}y"


def test_short_and_empty_values_are_not_registered() -> None:
    register_secrets(["", "ab", "12345"])
    assert redact_text("ab 12345 and more") == "ab 12345 and more"


# --- structured values and the structlog processor -------------------------------------


def test_redact_value_recurses_into_dicts_lists_and_tuples() -> None:
    secret = fresh_secret()
    register_secrets([secret])
    value = {
        "url": "https://x.test/a?token=T1&q=1",
        "nested": {"list": [f"has {secret}", 3, None], "tuple": ("ok", f"{secret}")},
        "count": 7,
        "flag": True,
    }
    shown = redact_value(value)
    assert shown == {
        "url": "https://x.test/a?token=***&q=1",
        "nested": {"list": [f"has {MASK}", 3, None], "tuple": ("ok", MASK)},
        "count": 7,
        "flag": True,
    }
    assert type(shown["nested"]["tuple"]) is tuple
    assert value["nested"]["list"][0] == f"has {secret}"  # the input is left as it was


def test_redact_event_masks_a_signed_url_in_an_event_value() -> None:
    event = {
        "event": "http.retry",
        "url": "https://caltopo.com/api/v1/map/M1/since/0?id=C1&expires=9&signature=s1g%3D",
        "attempt": 2,
        "context": {"urls": ["https://x.test/?signature=zz"]},
    }
    shown = redact_event(None, "warning", event)
    assert shown["url"] == "https://caltopo.com/api/v1/map/M1/since/0?id=C1&expires=9&signature=***"
    assert shown["context"] == {"urls": ["https://x.test/?signature=***"]}
    assert shown["event"] == "http.retry"
    assert shown["attempt"] == 2


# --- the whole logging pipeline --------------------------------------------------------


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_pipeline_renders_no_secret() -> None:
    secret = fresh_secret("exc")
    register_secrets([secret])
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    log = structlog.get_logger("syncd.test")

    log.debug("hidden.event", url="https://x.test/?signature=dbg")
    log.info("http.request", url="https://x.test/a?signature=SIGvalue1&id=C1", source="sar")
    try:
        raise RuntimeError(f"upstream said credential {secret} is revoked")
    except RuntimeError:
        log.exception("sync.failed", source="sar")
    logging.getLogger("aiohttp.client").warning(
        "retrying https://x.test/a?api_key=%s", "LIBKEYvalue"
    )

    output = stream.getvalue()
    for leaked in (secret, "SIGvalue1", "LIBKEYvalue"):
        assert leaked not in output
    records = _lines(stream)  # every line is one valid JSON object
    assert [r["event"] for r in records][:2] == ["http.request", "sync.failed"]
    assert "hidden.event" not in output  # below the configured level
    for record in records:
        assert {"timestamp", "level", "event"} <= record.keys()
        timestamp = str(record["timestamp"])
        assert timestamp.endswith("Z")
        datetime.fromisoformat(timestamp.removesuffix("Z") + "+00:00")
    request, failure = records[0], records[1]
    assert request["url"] == "https://x.test/a?signature=***&id=C1"
    assert request["source"] == "sar"
    assert failure["level"] == "error"
    exception = str(failure["exception"])
    assert "RuntimeError" in exception
    assert f"credential {MASK} is revoked" in exception
    assert len(records) == 3
    assert "api_key=***" in str(records[2]["event"])


def test_console_pipeline_renders_no_secret() -> None:
    secret = fresh_secret("con")
    register_secrets([secret])
    stream = io.StringIO()
    configure_logging("info", "console", stream=stream)
    log = structlog.get_logger("syncd.test")
    try:
        raise ValueError(f"bad {secret}")
    except ValueError:
        log.exception("sync.failed", url="https://x.test/?token=TOKvalue9")
    output = stream.getvalue()
    assert "sync.failed" in output
    assert "ValueError" in output
    assert secret not in output
    assert "TOKvalue9" not in output
