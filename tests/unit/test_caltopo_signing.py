"""The daemon's own CalTopo signer against the published vector and the page's reference code.

Why: the sandbox verifies signatures with its own code; these pin the daemon's side to
CalTopo's documented algorithm independently of the sandbox.
"""

from __future__ import annotations

import base64
import hmac
from urllib.parse import urlsplit

import pytest

from syncd.http import PreparedRequest
from syncd.sources.caltopo import SIGNATURE_LIFETIME_MS, CalTopoAuth, sign


def reference_sign(
    method: str, url: str, expires: int, payload_string: str, credential_secret: str
) -> str:
    """Verbatim from caltopo-team-api.txt."""
    message = f"{method} {url}\n{expires}\n{payload_string}"
    secret = base64.b64decode(credential_secret)
    signature = hmac.new(secret, message.encode(), "sha256").digest()
    return base64.b64encode(signature).decode()


def test_published_vector() -> None:
    signature = sign(
        "POST", "/api/v1/map/map123/LiveTrack", 1700000010000, '{"type":"Feature"}', "c2VjcmV0"
    )
    assert signature == "4c5G2oSEYaecJyf81tFERXDlcClrG4EZZPYWysPN+4Q="


@pytest.mark.parametrize(
    ("method", "path", "expires", "payload"),
    [
        ("GET", "/api/v1/acct/ABC123/since/0", 1751510019282, ""),
        ("GET", "/api/v1/map/AB12CD/since/1751510019282", 1751510139282, ""),
        ("DELETE", "/api/v1/acct/ABC123/CollaborativeMap/AB12CD", 1, ""),
        ("POST", "/api/v1/map/AB12CD/Marker", 1700000000000, '{"title": "café ⛺"}'),
    ],
)
def test_matches_reference_function(method: str, path: str, expires: int, payload: str) -> None:
    secret = base64.b64encode(b"\x00\xffsome-secret-bytes").decode()
    assert sign(method, path, expires, payload, secret) == reference_sign(
        method, path, expires, payload, secret
    )


def test_auth_signs_path_with_since_and_fresh_expiry() -> None:
    secret = base64.b64encode(b"k").decode()
    auth = CalTopoAuth("CRED12345678", secret, clock=lambda: 1_700_000_000.0)
    request = PreparedRequest("GET", "https://caltopo.com/api/v1/map/AB12CD/since/42?x=1")
    auth.apply(request)
    expires = 1_700_000_000_000 + SIGNATURE_LIFETIME_MS
    assert request.params["id"] == "CRED12345678"
    assert request.params["expires"] == str(expires)
    path = urlsplit(request.url).path
    assert path == "/api/v1/map/AB12CD/since/42"
    assert request.params["signature"] == reference_sign("GET", path, expires, "", secret)
    assert secret not in repr(auth)
