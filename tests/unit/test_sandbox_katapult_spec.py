"""The Katapult simulator checked against Katapult's own OpenAPI document.

Why: tests over a simulator prove only what the simulator does. Every read route
syncd uses (and the error shapes it reacts to) is requested over HTTP and validated
against the response schema the spec gives for that operation and status, so the
sandbox cannot drift into a world of its own. The spec is read from
`<repo>/../shared/apis/` (CI has it beside the checkout); it is never copied here.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from syncd.sandbox.katapult import API, populate
from tests.conftest import Sandbox

SPEC_PATH = Path(__file__).resolve().parents[2].parent / "shared/apis/katapult-openapi-v3.yaml"
BASE = "urn:katapult-openapi-v3"


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    if not SPEC_PATH.is_file():
        pytest.skip(f"Katapult's OpenAPI spec is not beside the checkout ({SPEC_PATH})")
    document: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
    # The spec's SuccessEnvelope says `data: object`, while every list operation adds
    # `data: array` through allOf; as written no list answer (Katapult's included)
    # could pass. Accept either at the envelope and keep each operation's own rule.
    document = copy.deepcopy(document)
    envelope = document["components"]["schemas"]["SuccessEnvelope"]["properties"]
    envelope["data"] = {"type": ["object", "array"]}
    return document


def response_schema(spec: dict[str, Any], route: str, status: int) -> dict[str, Any]:
    """The schema the spec gives for GET `route` answering `status` (or its `default`)."""
    responses = spec["paths"][route]["get"]["responses"]
    response = responses.get(str(status)) or responses["default"]
    if "$ref" in response:
        name = response["$ref"].rsplit("/", 1)[1]
        response = spec["components"]["responses"][name]
    schema: dict[str, Any] = response["content"]["application/json"]["schema"]
    return schema


def validate(spec: dict[str, Any], route: str, status: int, body: Any) -> None:
    registry: Registry[Any] = Registry().with_resource(
        BASE, Resource.from_contents(spec, default_specification=DRAFT202012)
    )
    schema = {"$id": f"{BASE}-check", **_rebase(response_schema(spec, route, status))}
    validator = Draft202012Validator(schema, registry=registry, format_checker=FormatChecker())
    errors = sorted(validator.iter_errors(body), key=lambda e: list(e.path))
    assert not errors, f"{route} {status}: " + "; ".join(
        f"{list(e.path)}: {e.message}" for e in errors[:5]
    )


def _rebase(schema: Any) -> Any:
    """Point the operation schema's local `#/...` refs at the spec document."""
    if isinstance(schema, dict):
        return {
            k: (f"{BASE}{v}" if k == "$ref" and v.startswith("#") else _rebase(v))
            for k, v in schema.items()
        }
    if isinstance(schema, list):
        return [_rebase(v) for v in schema]
    return schema


@pytest.fixture
async def client(sandbox: Sandbox) -> AsyncIterator[aiohttp.ClientSession]:
    sandbox.katapult.min_interval = 0  # shapes here; pacing has its own tests
    async with aiohttp.ClientSession() as session:
        yield session


async def get(
    session: aiohttp.ClientSession, sandbox: Sandbox, path: str, **params: str
) -> tuple[int, Any]:
    params.setdefault("api_key", sandbox.katapult.api_key)
    async with session.get(f"{sandbox.url}{API}{path}", params=params) as response:
        return response.status, await response.json()


async def test_every_read_route_syncd_uses_matches_the_spec(
    spec: dict[str, Any], sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    world = sandbox.katapult
    job_id = populate(world, jobs=2, poles=3, seed=4)[0]
    world.add_connection(job_id, *list(world.jobs[job_id].nodes)[:2], breakpoints=[[42.9, -78.8]])
    conn_id = next(iter(world.jobs[job_id].connections))
    stamp = world.jobs[job_id].nodes[next(iter(world.jobs[job_id].nodes))]["last_updated"]
    checks = [
        ("/", "/", {}),
        ("/jobs", "/jobs", {}),
        ("/jobs", "/jobs", {"includeArchived": "true", "metadataFilter": "city:Buffalo"}),
        ("/jobs", "/jobs", {"last_updated": "2020-01-01T00:00:00Z", "limit": "1"}),
        ("/jobs/{job_id}", f"/jobs/{job_id}", {"paths": "name,status,metadata,done,sharing"}),
        ("/jobs/{job_id}/status", f"/jobs/{job_id}/status", {}),
        ("/jobs/{job_id}/nodes", f"/jobs/{job_id}/nodes", {}),
        ("/jobs/{job_id}/nodes", f"/jobs/{job_id}/nodes", {"last_updated": stamp, "limit": "1"}),
        ("/jobs/{job_id}/connections", f"/jobs/{job_id}/connections", {}),
        (
            "/jobs/{job_id}/connections/{connection_id}/sections",
            f"/jobs/{job_id}/connections/{conn_id}/sections",
            {},
        ),
        ("/jobs/{job_id}/photos", f"/jobs/{job_id}/photos", {}),
        ("/jobs/{job_id}/traces", f"/jobs/{job_id}/traces", {}),
    ]
    for route, path, params in checks:
        status, body = await get(client, sandbox, path, **params)
        assert status == 200, (path, body)
        validate(spec, route, status, body)
        for item in body.get("data") if isinstance(body.get("data"), list) else []:
            if "last_updated" in item:
                datetime.fromisoformat(item["last_updated"])  # ISO 8601, as the spec says


@pytest.mark.parametrize(
    "case",
    [
        ("/jobs/{job_id}", "/jobs/-ONoSuchJob00000000", {}, 404, "not_found"),
        ("/jobs/{job_id}/status", "/jobs/-ONoSuchJob00000000/status", {}, 404, "not_found"),
        ("/jobs/{job_id}/nodes", "/jobs/{job}/nodes", {"last_updated": "yesterday"}, 400, None),
        ("/jobs", "/jobs", {"limit": "0"}, 400, "invalid_request"),
    ],
)
async def test_route_errors_use_the_error_envelope(
    spec: dict[str, Any],
    sandbox: Sandbox,
    client: aiohttp.ClientSession,
    case: tuple[str, str, dict[str, str], int, str | None],
) -> None:
    route, path, params, status, kind = case
    job_id = populate(sandbox.katapult, jobs=1, poles=2, seed=4)[0]
    got, body = await get(client, sandbox, path.format(job=job_id), **params)
    assert got == status
    validate(spec, route, got, body)
    assert kind is None or body["type"] == kind


async def test_empty_bucket_answers_429_with_meta(
    spec: dict[str, Any], sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    sandbox.katapult.tokens = 0
    status, body = await get(client, sandbox, "/jobs")
    assert status == 429 and body["type"] == "token_rate_limit_exceeded"
    validate(spec, "/jobs", status, body)
    assert body["meta"]["token_count"] == 0


@pytest.mark.parametrize(
    "case", [("", 400, "MISSING API KEY"), ("wrong-key", 401, "INVALID API KEY")]
)
async def test_middleware_errors_have_no_meta(
    spec: dict[str, Any],
    sandbox: Sandbox,
    client: aiohttp.ClientSession,
    case: tuple[str, int, str],
) -> None:
    api_key, status, error = case
    got, body = await get(client, sandbox, "/", api_key=api_key)
    assert (got, body) == (status, {"error": error})
    validate(spec, "/", got, body)


async def test_two_calls_within_50_ms_get_the_general_rate_limit(
    spec: dict[str, Any], sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    sandbox.katapult.min_interval = 60.0  # any second call is "too close"
    first, _ = await get(client, sandbox, "/jobs")
    status, body = await get(client, sandbox, "/jobs")
    assert (first, status) == (200, 429)
    assert body == {"error": "GENERAL RATE LIMIT EXCEEDED"}
    schema = spec["components"]["schemas"]["AuthErrorEnvelope"]
    Draft202012Validator(schema).validate(body)
    # The refused call costs nothing; the served one cost a GET.
    assert sandbox.katapult.tokens == sandbox.katapult.allotment - 1


def test_the_check_rejects_what_the_spec_forbids(spec: dict[str, Any]) -> None:
    """Guard against a validator that accepts anything (a broken $ref would)."""
    node = {"id": "-Onode", "latitude": "42.9", "longitude": -78.8, "attributes": {}}
    body = {"status": "success", "data": [node], "meta": {"token_count": 1, "last_refill_time": 1}}
    with pytest.raises(AssertionError, match="latitude"):
        validate(spec, "/jobs/{job_id}/nodes", 200, body)
    with pytest.raises(AssertionError, match="meta"):
        validate(spec, "/jobs/{job_id}/nodes", 200, {"status": "success", "data": []})
