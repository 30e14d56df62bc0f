"""Shared HTTP machinery: session, retries, auth, client-side limits, error mapping."""

from syncd.http.auth import Auth, BearerAuth, NoAuth, PreparedRequest, QueryKeyAuth
from syncd.http.client import HttpClient, classify
from syncd.http.limits import RequestLimiter, Unlimited
from syncd.http.ratelimit import KeyLimiter
from syncd.http.retry import RetryPolicy, parse_retry_after

__all__ = [
    "Auth",
    "BearerAuth",
    "HttpClient",
    "KeyLimiter",
    "NoAuth",
    "PreparedRequest",
    "QueryKeyAuth",
    "RequestLimiter",
    "RetryPolicy",
    "Unlimited",
    "classify",
    "parse_retry_after",
]
