"""Property-based fuzzing of POST /v1/identity/scan against the daemon's own OpenAPI document.

Bodies come from the request schema the daemon serves at /openapi.json, from valid bodies with
mutations, from arbitrary JSON values and from arbitrary bytes. Whatever arrives, the daemon
must never return a 5xx status, every status must be documented, a 200 body must match the
documented response schema, and a 4xx body must be problem+json with type, title, status and
detail.

The runs are bounded (about 300 examples in all) and derandomized, so CI sees the same inputs
every time.
"""

from __future__ import annotations

import base64
import json
import string
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from tests.conftest import SAMPLE_RECORDS, Daemon, Reply

SCAN_PATH = "/v1/identity/scan"
EXAMPLES_PER_TEST = 75
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_TEST,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SERVED_STORES = ["STORE-001", "STORE-002"]
PROBLEM_MEDIA_TYPE = "application/problem+json"

# Keywords the strategy builder understands. Annotations change nothing about valid values.
ANNOTATIONS = {"title", "description", "default", "examples"}
SUPPORTED_KEYWORDS = {
    "type", "properties", "required", "enum", "pattern", "maxLength", "minLength", "format",
    "$ref", *ANNOTATIONS,
}  # fmt: skip


# --- the served document -------------------------------------------------------------------


@pytest.fixture(scope="module")
def openapi(shared_daemon: Daemon) -> dict[str, Any]:
    reply = shared_daemon.request("GET", "/openapi.json")
    assert reply.status == 200, reply.body
    return reply.json()


def resolve(node: Any, document: dict[str, Any]) -> Any:
    """Inline every local ``$ref`` so the strategy builder gets plain schemas."""
    if isinstance(node, dict):
        if "$ref" in node:
            pointer = node["$ref"].removeprefix("#/").split("/")
            target: Any = document
            for part in pointer:
                target = target[part]
            return resolve(target, document)
        return {key: resolve(value, document) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve(item, document) for item in node]
    return node


def scan_operation(document: dict[str, Any]) -> dict[str, Any]:
    return document["paths"][SCAN_PATH]["post"]


def request_schema(document: dict[str, Any]) -> dict[str, Any]:
    body = scan_operation(document)["requestBody"]["content"]["application/json"]["schema"]
    return resolve(body, document)


def response_validator(document: dict[str, Any], status: int) -> tuple[str, Draft202012Validator]:
    """Return the documented media type for ``status`` and a validator for its schema."""
    content = scan_operation(document)["responses"][str(status)]["content"]
    (media_type, entry), *_others = content.items()
    # The document's components stay reachable for nested $refs under the same root.
    schema = {**entry["schema"], "components": document["components"]}
    return media_type, Draft202012Validator(schema)


# --- strategies from a JSON schema ---------------------------------------------------------


def rfc3339_datetimes() -> st.SearchStrategy[str]:
    """Date-times with an offset, across years 1 to 9999 and near the present."""
    offsets = st.sampled_from(
        [UTC, timezone(timedelta(hours=14)), timezone(-timedelta(hours=12, minutes=30))]
    )
    anywhen = st.datetimes(
        min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31), timezones=offsets
    )
    recent = st.integers(-900, 900).map(
        lambda seconds: datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=seconds)
    )
    moments = st.one_of(anywhen, recent)
    return moments.map(lambda moment: moment.isoformat().replace("+00:00", "Z"))


def strategy_for(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Build a strategy for the values a schema accepts, and fail on keywords it does not know.

    Covers what the request schema uses today (objects, strings with pattern, length and
    date-time format, enums), so a new keyword in the document stops the test instead of
    being ignored.
    """
    unknown = set(schema) - SUPPORTED_KEYWORDS
    if unknown:
        raise NotImplementedError(f"no strategy for schema keywords {sorted(unknown)}")
    if "enum" in schema:
        return st.sampled_from(schema["enum"])

    kind = schema.get("type")
    if kind == "object":
        properties = {name: strategy_for(sub) for name, sub in schema["properties"].items()}
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {name: value for name, value in properties.items() if name in required},
            optional={name: value for name, value in properties.items() if name not in required},
        )
    if kind == "string":
        return string_strategy(schema)
    raise NotImplementedError(f"no strategy for schema type {kind!r}")


def string_strategy(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    minimum = schema.get("minLength", 0)
    maximum = schema.get("maxLength")
    if schema.get("format") is not None:
        if schema["format"] != "date-time":
            raise NotImplementedError(f"no strategy for string format {schema['format']!r}")
        strings = rfc3339_datetimes()
    elif "pattern" in schema:
        strings = st.from_regex(schema["pattern"], fullmatch=True)
    else:
        strings = st.text(min_size=minimum, max_size=maximum if maximum is not None else 300)
    return strings.filter(
        lambda text: len(text) >= minimum and (maximum is None or len(text) <= maximum)
    )


KNOWN_VALUES = [record["key"] for record in SAMPLE_RECORDS] + [
    base64.b64encode(SAMPLE_RECORDS[0]["key"].encode()).decode(),
    SAMPLE_RECORDS[1]["key"] + "\r\n",
    "04A23B1C5D6E80",
]


@st.composite
def schema_bodies(draw: st.DrawFn, schema: dict[str, Any]) -> dict[str, Any]:
    """A body valid under the served schema, often steered to a served store and known keys.

    Without the steering nearly every body names an unknown store and gets 400, so the 200
    path and its response schema would go untested.
    """
    body = draw(strategy_for(schema))
    # Steering is the simplest choice, because Hypothesis draws small integers most often.
    if draw(st.integers(0, 3)) < 3:
        body["storeId"] = draw(st.sampled_from(SERVED_STORES))
        scan_event = body["scanEvent"]
        if draw(st.integers(0, 3)) < 3:
            scan_event["value"] = draw(st.sampled_from(KNOWN_VALUES))
        if draw(st.integers(0, 3)) < 3:
            scan_event["timestamp"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        # Hypothesis draws the same few UUIDs again and again, and a reused scanEvent.id with
        # another payload is a 422. An id derived from the payload makes a repeat a replay.
        payload = json.dumps({**scan_event, "id": None, "storeId": body["storeId"]})
        scan_event["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, payload))
    return body


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
awkward_strings = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "\r\n",
        "x" * 1001,
        "é" * 1000,
        "\U0001f600" * 300,
        "00000000-0000-0000-0000-00000000000g",
        "2024-04-25T13:03:14",
        "2024-02-30T13:03:14Z",
        "9999-12-31T23:59:59-23:59",
        "entry",
        "OPTICAL ",
        "STORE-001",
    ]
)
FIELD_PATHS = [
    ("requestId",),
    ("storeId",),
    ("scanEvent",),
    ("scanEvent", "id"),
    ("scanEvent", "timestamp"),
    ("scanEvent", "location"),
    ("scanEvent", "value"),
    ("scanEvent", "channel"),
]


@st.composite
def mutated_bodies(draw: st.DrawFn, schema: dict[str, Any]) -> Any:
    """A valid body with one to three fields removed, retyped, replaced or added."""
    body: Any = draw(schema_bodies(schema))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(FIELD_PATHS))
        parent = body
        for part in path[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        mutation = draw(st.sampled_from(["delete", "any value", "awkward string", "add field"]))
        event(f"mutation: {mutation}")
        if mutation == "delete":
            parent.pop(path[-1], None)
        elif mutation == "any value":
            parent[path[-1]] = draw(json_values)
        elif mutation == "awkward string":
            parent[path[-1]] = draw(awkward_strings)
        else:
            parent[draw(st.text(min_size=1, max_size=12))] = draw(json_values)
    if draw(st.integers(0, 9)) == 0:
        body = draw(st.sampled_from([[body], json.dumps(body), None]))
    return body


def encode_json(value: Any, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8")


# --- checks ---------------------------------------------------------------------------------


def post(daemon: Daemon, body: bytes, content_type: str | None) -> Reply:
    headers = {} if content_type is None else {"Content-Type": content_type}
    return daemon.request("POST", SCAN_PATH, body, headers)


def last_failure(daemon: Daemon) -> str:
    """Return the last line of the newest logged request failure, to explain a 5xx."""
    failures = [line for line in daemon.log_lines() if line.get("event") == "request.failed"]
    if not failures:
        return "(no request.failed line in the daemon log)"
    lines = str(failures[-1].get("exception", "")).strip().splitlines()
    return lines[-1] if lines else "(request.failed without a traceback)"


def check_documented_answer(reply: Reply, document: dict[str, Any], daemon: Daemon) -> None:
    """Assert the reply is what the OpenAPI document promises for its status."""
    event(f"status {reply.status}")
    assert reply.status < 500, f"server error {reply.status}: {last_failure(daemon)}"
    responses = scan_operation(document)["responses"]
    assert str(reply.status) in responses, f"status {reply.status} is not documented"

    media_type, validator = response_validator(document, reply.status)
    content_type = reply.headers.get("Content-Type", "").split(";")[0].strip()
    assert content_type == media_type, f"status {reply.status} sent {content_type!r}"
    body = json.loads(reply.body)
    errors = [error.message for error in validator.iter_errors(body)]
    assert errors == [], f"status {reply.status} body {body!r} breaks its schema"
    if 400 <= reply.status < 500:
        assert content_type == PROBLEM_MEDIA_TYPE
        assert body["status"] == reply.status


# --- properties -------------------------------------------------------------------------------


@FUZZ_SETTINGS
@given(data=st.data())
def test_schema_bodies(shared_daemon: Daemon, openapi: dict[str, Any], data: st.DataObject) -> None:
    body = data.draw(schema_bodies(request_schema(openapi)), label="body")
    ascii_only = data.draw(st.booleans(), label="ascii_only")

    reply = post(shared_daemon, encode_json(body, ascii_only), "application/json")

    check_documented_answer(reply, openapi, shared_daemon)


@FUZZ_SETTINGS
@given(data=st.data())
def test_mutated_bodies(
    shared_daemon: Daemon, openapi: dict[str, Any], data: st.DataObject
) -> None:
    body = data.draw(mutated_bodies(request_schema(openapi)), label="body")
    ascii_only = data.draw(st.booleans(), label="ascii_only")

    reply = post(shared_daemon, encode_json(body, ascii_only), "application/json")

    check_documented_answer(reply, openapi, shared_daemon)


deeply_nested = st.integers(1, 9000).map(lambda depth: "[" * depth + "]" * depth)


@FUZZ_SETTINGS
@given(value=json_values, ascii_only=st.booleans())
def test_arbitrary_json(
    shared_daemon: Daemon, openapi: dict[str, Any], value: Any, ascii_only: bool
) -> None:
    reply = post(shared_daemon, encode_json(value, ascii_only), "application/json")

    check_documented_answer(reply, openapi, shared_daemon)


content_types = st.sampled_from(
    [
        None,
        "application/json",
        "application/json; charset=utf-8",
        "application/merge-patch+json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "",
    ]
)
raw_bodies = st.one_of(
    st.binary(max_size=2048),
    st.text(alphabet=string.printable, max_size=200).map(str.encode),
    deeply_nested.map(str.encode),
)


@FUZZ_SETTINGS
@given(body=raw_bodies, content_type=content_types)
# A JSON value of the wrong type followed by more bytes. The typed decoder reports the type,
# and the untyped decoder that runs next fails on the trailing bytes.
@example(body=b"1 2", content_type="application/json")
@example(body=b'{"storeId": 5} x', content_type="application/json")
@example(body=b'{"requestId": "r"}\x00', content_type="application/json")
def test_arbitrary_bytes(
    shared_daemon: Daemon, openapi: dict[str, Any], body: bytes, content_type: str | None
) -> None:
    reply = post(shared_daemon, body, content_type)

    check_documented_answer(reply, openapi, shared_daemon)
