"""Large answers read as streams: JsonDocument, and CalTopo's streamed map answers.

Why: a 100k-object map parsed whole cost 14x its size in memory (issue 7); streaming
must not change a single outcome: the same records, the same cursor, the same proofs
and the same errors as the stdlib's whole-body parse, whatever the key order.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from syncd.errors import ProtocolError, SourceError
from syncd.http.document import SPOOL_MEMORY, JsonDocument, NonStandardJson
from syncd.sources.caltopo import _map_answer, _whole_map_answer


def doc(body: bytes | str) -> JsonDocument:
    return JsonDocument.of(body.encode() if isinstance(body, str) else body, url="http://x/y")


def test_values_read_the_whole_body_so_a_broken_tail_is_caught() -> None:
    assert doc('{"result": {"ids": {"A": ["1"]}}, "x": [1, 2]}').values("result.ids") == [
        {"A": ["1"]}
    ]
    with pytest.raises(ProtocolError, match="not valid JSON"):
        doc('{"result": {"ids": {"A": ["1"]}}, "x": [1, 2').values("result.ids")


@pytest.mark.parametrize(
    "body",
    ['{"x": [1, NaN]}', '{"x": -Infinity}', '{"x": 123456789012345678901234567890}'],
)
def test_what_only_the_stdlib_reads_is_named_and_still_loadable(body: str) -> None:
    document = doc(body)
    with pytest.raises(NonStandardJson):
        document.values("x")
    assert json.dumps(document.load()) == json.dumps(json.loads(body))


@pytest.mark.parametrize(("body", "reason"), [(b"", "empty body"), (b"<html>", "not JSON")])
def test_bodies_that_are_not_json_are_protocol_errors(body: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        doc(body).load()


def test_scalars_stop_at_the_big_array_once_every_wanted_value_is_known() -> None:
    # Everything after the array's start is garbage: reading it would raise.
    body = '{"status": "ok", "timestamp": 5, "result": {"timestamp": 6, "list": [ !!!'
    head, kind = doc(body).scalars({"status", "timestamp", "result.timestamp"}, until="result.list")
    assert head == {"status": "ok", "timestamp": 5, "result.timestamp": 6}
    assert kind == "start_array"


def test_scalars_after_the_array_are_still_found() -> None:
    body = '{"result": {"list": [1, 2], "timestamp": 6}, "status": "ok"}'
    head, kind = doc(body).scalars({"status", "result.timestamp"}, until="result.list")
    assert (head, kind) == ({"status": "ok", "result.timestamp": 6}, "start_array")


def test_items_are_parsed_as_they_are_pulled() -> None:
    items = doc('{"list": [{"a": 1}, {"b": 2}, !!!').items("list.item")
    assert next(items) == {"a": 1}
    assert next(items) == {"b": 2}
    with pytest.raises(ProtocolError):
        next(items)


def test_a_large_body_goes_to_disk_and_reads_back_exactly() -> None:
    features = [{"id": str(i), "v": "é" * 40} for i in range(SPOOL_MEMORY // 50)]
    body = json.dumps({"list": features}).encode()
    document = doc(body)
    assert document._file._rolled  # type: ignore[attr-defined]
    assert list(document.items("list.item")) == features
    document.close()


# --- CalTopo map answers: streamed == whole ------------------------------------------

FEATURE = {"id": "a", "properties": {"class": "Marker", "title": "A"}, "geometry": None}
OTHER = {"id": "b", "properties": {"class": "Shape", "title": "B"}}


def envelope(*, order: str = "usual", **result: Any) -> str:
    result = {
        "timestamp": 7,
        "state": {"type": "FeatureCollection", "features": [FEATURE]},
    } | result
    if order == "ids-first" and "ids" in result:
        result = {"ids": result.pop("ids"), **result}
    if order == "timestamp-last":
        result = {k: v for k, v in result.items() if k != "timestamp"} | {"timestamp": 7}
    body = {"status": "ok", "timestamp": 7, "result": result}
    if order == "status-last":
        body = {"result": result, "timestamp": 7, "status": "ok"}
    return json.dumps(body)


ANSWERS = {
    "usual": envelope(),
    "with-ids": envelope(ids={"Marker": ["a"], "Shape": ["b"]}),
    "ids-first": envelope(order="ids-first", ids={"Marker": ["a"]}),
    "timestamp-last": envelope(order="timestamp-last"),
    "status-last": envelope(order="status-last"),
    "two-features": envelope(state={"features": [FEATURE, OTHER]}),
    "no-result-timestamp": json.dumps(
        {"status": "ok", "timestamp": 9, "result": {"state": {"features": []}}}
    ),
    "nan-in-a-feature": envelope(state={"features": [FEATURE, {"id": "n", "x": float("nan")}]}),
    "error-envelope": json.dumps({"status": "error", "code": 401, "message": "login required"}),
    "missing-features": envelope(state={"type": "FeatureCollection"}),
    "features-not-a-list": envelope(state={"features": {"a": 1}}),
    "no-state": json.dumps({"status": "ok", "timestamp": 7, "result": {"timestamp": 7}}),
    "bad-timestamp": envelope(timestamp="soon"),
}


def outcome(read: Any) -> Any:
    try:
        answer = read()
        return (answer.timestamp, answer.ids, json.dumps(list(answer.features)))
    except SourceError as err:
        return (type(err), err.message)


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_streamed_map_answers_equal_the_whole_parse(name: str) -> None:
    body = ANSWERS[name]
    streamed = outcome(lambda: _map_answer(doc(body), "/map"))
    whole = outcome(lambda: _whole_map_answer(json.loads(body), "/map"))
    assert streamed == whole


def test_depth_is_measured_in_one_linear_pass() -> None:
    assert doc('{"a": [1, {"b": []}], "c": {}}').depth() == 4
    assert doc("[" * 200_000 + "]" * 200_000).depth() == 200_000  # 400 KB: ijson's
    # prefix-tracking readers took 6 GB for a quarter of this depth


def test_an_absurdly_deep_map_answer_fails_like_the_whole_parse_did() -> None:
    deep = "[" * 50_000 + "]" * 50_000
    body = (
        '{"status": "ok", "timestamp": 7, "result": {"timestamp": 7, "state": '
        f'{{"features": [{{"id": "a", "properties": {{"class": "Marker", "x": {deep}}}}}]}}}}}}'
    )
    with pytest.raises(ProtocolError, match="not JSON"):
        _map_answer(doc(body), "/map")
