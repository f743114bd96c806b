"""The validation table: every field rule of the contract, and every kind of bad input."""

from __future__ import annotations

import copy
import gzip
import json
import socket
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import compression_utils

from tests.conftest import Daemon, Reply, labelled_samples, now_rfc3339, scan_body

UUID = "0f8fad5b-d9cb-469f-a165-70867728950e"
MISSING = object()


def _with(path: str, value: Any) -> dict[str, Any]:
    body = scan_body("KEY-SHOPPER-5f1c2b")
    target = body
    parts = path.split(".")
    for part in parts[:-1]:
        target = target[part]
    if value is MISSING:
        del target[parts[-1]]
    else:
        target[parts[-1]] = value
    return body


FIELD_CASES: list[tuple[str, str, Any]] = [
    # (case id, dotted field, value)
    ("requestId missing", "requestId", MISSING),
    ("storeId missing", "storeId", MISSING),
    ("scanEvent missing", "scanEvent", MISSING),
    ("scanEvent.id missing", "scanEvent.id", MISSING),
    ("timestamp missing", "scanEvent.timestamp", MISSING),
    ("location missing", "scanEvent.location", MISSING),
    ("value missing", "scanEvent.value", MISSING),
    ("channel missing", "scanEvent.channel", MISSING),
    ("requestId not uuid", "requestId", "not-a-uuid"),
    ("requestId one short", "requestId", UUID[:-1]),
    ("requestId one long", "requestId", UUID + "0"),
    ("requestId non-hex", "requestId", "0f8fad5b-d9cb-469f-a165-70867728950g"),
    ("requestId no dashes", "requestId", UUID.replace("-", "")),
    ("requestId trailing newline", "requestId", UUID + "\n"),
    ("scanEvent.id not uuid", "scanEvent.id", "abc"),
    ("scanEvent.id braces", "scanEvent.id", "{" + UUID + "}"),
    ("storeId 256 chars", "storeId", "S" * 256),
    ("value 1001 chars", "scanEvent.value", "v" * 1001),
    ("location lower case", "scanEvent.location", "entry"),
    ("location unknown", "scanEvent.location", "LOBBY"),
    ("location empty", "scanEvent.location", ""),
    ("channel lower case", "scanEvent.channel", "optical"),
    ("channel unknown", "scanEvent.channel", "BLUETOOTH"),
    ("timestamp no offset", "scanEvent.timestamp", "2024-04-25T13:03:14"),
    ("timestamp date only", "scanEvent.timestamp", "2024-04-25"),
    ("timestamp Feb 30", "scanEvent.timestamp", "2024-02-30T13:03:14Z"),
    ("timestamp month 13", "scanEvent.timestamp", "2024-13-01T13:03:14Z"),
    ("timestamp hour 25", "scanEvent.timestamp", "2024-04-25T25:03:14Z"),
    ("timestamp epoch number", "scanEvent.timestamp", 1714050194),
    ("timestamp words", "scanEvent.timestamp", "yesterday"),
    ("requestId null", "requestId", None),
    ("storeId null", "storeId", None),
    ("scanEvent null", "scanEvent", None),
    ("value null", "scanEvent.value", None),
    ("channel null", "scanEvent.channel", None),
    ("requestId number", "requestId", 42),
    ("storeId number", "storeId", 1),
    ("storeId list", "storeId", ["STORE-001"]),
    ("value object", "scanEvent.value", {"a": 1}),
    ("value boolean", "scanEvent.value", True),
    ("location number", "scanEvent.location", 1),
    ("scanEvent string", "scanEvent", "ENTRY"),
    ("scanEvent list", "scanEvent", []),
    ("storeId not served", "storeId", "STORE-404"),
]


@pytest.mark.parametrize(
    ("field", "value"), [case[1:] for case in FIELD_CASES], ids=[case[0] for case in FIELD_CASES]
)
def test_field_rule_rejected(shared_daemon: Daemon, field: str, value: Any) -> None:
    reply = shared_daemon.post_json(_with(field, value))
    assert reply.status == 400
    assert reply.headers["Content-Type"] == "application/problem+json"
    problem = reply.json()
    assert problem["status"] == 400
    assert [error["field"] for error in problem["errors"]] == [field]


EDGE_CASES_ACCEPTED: list[tuple[str, str, Any]] = [
    ("storeId 255 chars is valid shape", "storeId", "S" * 255),
    ("value 1000 chars", "scanEvent.value", "v" * 1000),
    ("value empty", "scanEvent.value", ""),
    ("uuid upper case", "requestId", UUID.upper()),
    ("timestamp offset", "scanEvent.timestamp", "OFFSET"),
    ("timestamp fraction", "scanEvent.timestamp", "FRACTION"),
]


@pytest.mark.parametrize(
    ("field", "value"),
    [case[1:] for case in EDGE_CASES_ACCEPTED],
    ids=[case[0] for case in EDGE_CASES_ACCEPTED],
)
def test_edge_value_passes_schema(shared_daemon: Daemon, field: str, value: Any) -> None:
    body = _with(field, value)
    if value == "OFFSET":
        # The current time written in +05:30.
        from datetime import datetime, timedelta, timezone

        body["scanEvent"]["timestamp"] = datetime.now(
            timezone(timedelta(hours=5, minutes=30))
        ).isoformat(timespec="seconds")
    if value == "FRACTION":
        body["scanEvent"]["timestamp"] = now_rfc3339().replace("Z", ".123456Z")
    reply = shared_daemon.post_json(body)
    if field == "storeId":
        # The shape is valid; the store is simply not one this box serves.
        assert reply.json()["errors"][0]["message"].startswith("store ")
        return
    assert reply.status == 200


def test_all_errors_reported_at_once(shared_daemon: Daemon) -> None:
    body = scan_body("x")
    body["requestId"] = "bad"
    body["scanEvent"]["location"] = "NOWHERE"
    del body["scanEvent"]["channel"]
    problem = shared_daemon.post_json(body).json()
    fields = [error["field"] for error in problem["errors"]]
    assert fields == ["requestId", "scanEvent.location", "scanEvent.channel"]


def test_unknown_attributes_ignored(shared_daemon: Daemon) -> None:
    body = scan_body("KEY-SHOPPER-5f1c2b")
    body["newTopLevel"] = {"nested": [1, 2, {"deep": None}]}
    body["scanEvent"]["newField"] = "ignored"
    reply = shared_daemon.post_json(body)
    assert reply.status == 200
    assert reply.json()["action"] == "ACCEPT"


def test_value_not_echoed_in_error(shared_daemon: Daemon) -> None:
    secret = "SECRET-VALUE-" + "x" * 1000
    reply = shared_daemon.post_json(_with("scanEvent.value", secret))
    assert reply.status == 400
    assert b"SECRET-VALUE" not in reply.body


RAW_BODY_CASES: list[tuple[str, bytes, int]] = [
    ("empty body", b"", 400),
    ("whitespace body", b"   ", 400),
    ("malformed json", b'{"requestId": ', 400),
    ("trailing garbage", json.dumps(scan_body("x")).encode() + b"}", 400),
    ("json array", b"[1, 2, 3]", 400),
    ("json string", b'"hello"', 400),
    ("json null", b"null", 400),
    ("json number", b"42", 400),
    ("invalid utf-8", b'{"requestId": "\xff\xfe"}', 400),
    ("deep nesting array", b"[" * 5000 + b"]" * 5000, 400),
    ("deep nesting in unknown field", b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
    ("oversized body", b'{"pad": "' + b"a" * 20000 + b'"}', 413),
]


@pytest.mark.parametrize(
    ("body", "status"),
    [case[1:] for case in RAW_BODY_CASES],
    ids=[case[0] for case in RAW_BODY_CASES],
)
def test_bad_body_clear_answer(shared_daemon: Daemon, body: bytes, status: int) -> None:
    reply = shared_daemon.request(
        "POST", "/v1/identity/scan", body, {"Content-Type": "application/json"}
    )
    assert reply.status == status
    problem = reply.json()
    assert problem["status"] == status
    assert problem["detail"]


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        ("application/xml", 415),
        ("application/json; charset=utf-8", 200),
        ("Application/JSON", 200),
    ],
)
def test_content_type(shared_daemon: Daemon, content_type: str, status: int) -> None:
    reply = shared_daemon.post_json(scan_body("KEY-SHOPPER-5f1c2b"), content_type=content_type)
    assert reply.status == status


def test_missing_content_type_is_415(shared_daemon: Daemon) -> None:
    body = json.dumps(scan_body("KEY-SHOPPER-5f1c2b")).encode()
    reply = shared_daemon.request("POST", "/v1/identity/scan", body, {})
    assert reply.status == 415


def test_chunked_oversized_body_is_413(shared_daemon: Daemon) -> None:
    chunk = b"a" * 4096
    with socket.create_connection(("127.0.0.1", shared_daemon.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/identity/scan HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        for _ in range(6):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.sendall(b"0\r\n\r\n")
        received = b""
        while chunk_in := sock.recv(65536):
            received += chunk_in
    assert received.startswith(b"HTTP/1.1 413")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_wrong_method_is_405(shared_daemon: Daemon, method: str) -> None:
    reply = shared_daemon.request(method, "/v1/identity/scan")
    assert reply.status == 405
    assert reply.headers["Allow"] == "POST"
    assert reply.json()["status"] == 405


def test_unknown_path_is_404(shared_daemon: Daemon) -> None:
    reply = shared_daemon.request("POST", "/v1/identity/scans", b"{}")
    assert reply.status == 404
    assert reply.headers["Content-Type"] == "application/problem+json"


def test_body_limit_configurable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import make_daemon

    instance = make_daemon(tmp_path)
    text = instance.config.read_text().replace("[server]\n", "[server]\nmax_body_size = 512\n")
    instance.config.write_text(text)
    instance.start()
    try:
        body = copy.deepcopy(scan_body("KEY-SHOPPER-5f1c2b"))
        body["pad"] = "p" * 600
        assert instance.post_json(body).status == 413
        assert instance.scan("KEY-SHOPPER-5f1c2b").status == 200
    finally:
        instance.stop()
    logged = [line for line in instance.log_lines() if line["event"] == "request.invalid"]
    assert [(line["problem"], line["limit"]) for line in logged] == [("body-too-large", 512)]


def test_trailing_value_after_number_is_400(shared_daemon: Daemon) -> None:
    reply = shared_daemon.request(
        "POST", "/v1/identity/scan", b"1 2", {"Content-Type": "application/json"}
    )
    assert reply.status == 400


def _post_raw(daemon: Daemon, text: str, headers: dict[str, str] | None = None) -> Reply:
    return daemon.request(
        "POST",
        "/v1/identity/scan",
        text.encode(),
        {"Content-Type": "application/json", **(headers or {})},
    )


# (case id, JSON text that replaces the scanned value, status, fields named in errors)
# A repeated key keeps its last value, whichever occurrence is invalid.
DUPLICATE_KEY_CASES: list[tuple[str, str, int, list[str]]] = [
    ("number then string", '5, "value": "KEY-SHOPPER-5f1c2b"', 200, []),
    ("null then string", 'null, "value": "KEY-SHOPPER-5f1c2b"', 200, []),
    ("string then number", '"KEY-SHOPPER-5f1c2b", "value": 5', 400, ["scanEvent.value"]),
    ("revoked then active", '"KEY-REVOKED-0d9e77", "value": "KEY-SHOPPER-5f1c2b"', 200, []),
]


@pytest.mark.parametrize(
    ("replacement", "status", "fields"),
    [case[1:] for case in DUPLICATE_KEY_CASES],
    ids=[case[0] for case in DUPLICATE_KEY_CASES],
)
def test_duplicate_key_last_wins(
    shared_daemon: Daemon, replacement: str, status: int, fields: list[str]
) -> None:
    text = json.dumps(scan_body("KEY-SHOPPER-5f1c2b"))
    text = text.replace('"KEY-SHOPPER-5f1c2b"', replacement)

    reply = _post_raw(shared_daemon, text)

    assert reply.status == status
    if status == 200:
        assert reply.json()["action"] == "ACCEPT"
    else:
        assert [error["field"] for error in reply.json()["errors"]] == fields


def test_duplicate_scan_event_last_wins(shared_daemon: Daemon) -> None:
    text = json.dumps(scan_body("KEY-SHOPPER-5f1c2b"))
    text = text.replace('"scanEvent": {', '"scanEvent": "ENTRY", "scanEvent": {')

    reply = _post_raw(shared_daemon, text)

    assert reply.status == 200
    assert reply.json()["action"] == "ACCEPT"


# (case id, JSON text to replace, its replacement, status, fields named in errors).
# An unpaired surrogate escape is valid JSON syntax but no Unicode character.
SURROGATE_CASES: list[tuple[str, str, str, int, list[str]]] = [
    ("value high", '"KEY-SHOPPER-5f1c2b"', '"KEY-\\ud800"', 400, ["scanEvent.value"]),
    ("value low", '"KEY-SHOPPER-5f1c2b"', '"KEY-\\udc00"', 400, ["scanEvent.value"]),
    ("value reversed", '"KEY-SHOPPER-5f1c2b"', '"\\udc00\\ud800"', 400, ["scanEvent.value"]),
    ("storeId", '"STORE-001"', '"STORE-\\ud800"', 400, ["storeId"]),
    ("location", '"ENTRY"', '"\\ud800"', 400, ["scanEvent.location"]),
    ("unknown key", '"requestId"', '"x\\ud800": 1, "requestId"', 200, []),
    ("unknown value", '"requestId"', '"x": "\\ud800", "requestId"', 200, []),
]


@pytest.mark.parametrize(
    ("old", "new", "status", "fields"),
    [case[1:] for case in SURROGATE_CASES],
    ids=[case[0] for case in SURROGATE_CASES],
)
def test_unpaired_surrogate_names_field(
    shared_daemon: Daemon, old: str, new: str, status: int, fields: list[str]
) -> None:
    text = json.dumps(scan_body("KEY-SHOPPER-5f1c2b")).replace(old, new, 1)

    reply = _post_raw(shared_daemon, text)

    assert reply.status == status
    if status == 400:
        problem = reply.json()
        assert [error["field"] for error in problem["errors"]] == fields
        assert "surrogate" in problem["errors"][0]["message"]


def test_surrogate_pair_accepted(shared_daemon: Daemon) -> None:
    text = json.dumps(scan_body("KEY-\U0001f600"))
    assert "\\ud83d\\ude00" in text

    reply = _post_raw(shared_daemon, text)

    assert reply.status == 200


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_body_named_in_detail(shared_daemon: Daemon, encoding: str) -> None:
    body = json.dumps(scan_body("KEY-SHOPPER-5f1c2b")).encode(encoding)

    reply = shared_daemon.request(
        "POST", "/v1/identity/scan", body, {"Content-Type": "application/json"}
    )

    assert reply.status == 400
    assert "UTF-16 or UTF-32" in reply.json()["detail"]


def _plain(data: bytes) -> bytes:
    return data


def _brotli(data: bytes) -> bytes:
    if not compression_utils.HAS_BROTLI:
        return data  # aiohttp rejects the Content-Encoding header before the body arrives.
    try:
        import brotlicffi as brotli
    except ImportError:
        import brotli
    return brotli.compress(data)


def _zstd(data: bytes) -> bytes:
    if not compression_utils.HAS_ZSTD:
        return data  # aiohttp rejects the Content-Encoding header before the body arrives.
    try:
        from compression import zstd
    except ImportError:
        from backports import zstd
    return zstd.compress(data)


# aiohttp decodes br only with the Brotli package installed, and zstd only on Python 3.14+ or
# with backports.zstd. Without them its parser responds with 400 itself, and with them the
# daemon responds with 415, because the API accepts gzip and deflate only.
BROTLI_STATUS = 415 if compression_utils.HAS_BROTLI else 400
ZSTD_STATUS = 415 if compression_utils.HAS_ZSTD else 400

# (Content-Encoding header, how the body is encoded, status). aiohttp decodes gzip and
# deflate, and passes a body with a coding that it does not know on as it came.
CONTENT_CODING_CASES: list[tuple[str, Callable[[bytes], bytes], int]] = [
    ("gzip", gzip.compress, 200),
    ("GZIP", gzip.compress, 200),
    ("deflate", zlib.compress, 200),
    ("identity", _plain, 200),
    ("x-gzip", gzip.compress, 415),
    ("compress", _plain, 415),
    ("snappy", _plain, 415),
    ("gzip, gzip", lambda data: gzip.compress(gzip.compress(data)), 415),
    ("gzip, identity", gzip.compress, 415),
    ("br", _brotli, BROTLI_STATUS),
    ("zstd", _zstd, ZSTD_STATUS),
]


@pytest.mark.parametrize(
    ("coding", "encode", "status"),
    CONTENT_CODING_CASES,
    ids=[case[0] for case in CONTENT_CODING_CASES],
)
def test_content_encoding(
    shared_daemon: Daemon, coding: str, encode: Callable[[bytes], bytes], status: int
) -> None:
    body = encode(json.dumps(scan_body("KEY-SHOPPER-5f1c2b")).encode())

    reply = shared_daemon.request(
        "POST",
        "/v1/identity/scan",
        body,
        {"Content-Type": "application/json", "Content-Encoding": coding},
    )

    assert reply.status == status
    if status == 415:
        assert reply.headers["Accept-Encoding"] == "gzip, deflate"
        problem = reply.json()
        assert problem["type"].endswith(":unsupported-content-encoding")
        assert repr(coding) in problem["detail"]


# (Content-Type header or None to leave it out, words the detail must contain)
MEDIA_TYPE_CASES: list[tuple[str | None, str]] = [
    (None, "no Content-Type header"),
    ("text/json", "'text/json' is not supported"),
    ("application/+json", "'application/+json' is not supported"),
]


@pytest.mark.parametrize(("content_type", "words"), MEDIA_TYPE_CASES)
def test_unsupported_media_type_detail(
    shared_daemon: Daemon, content_type: str | None, words: str
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    body = json.dumps(scan_body("KEY-SHOPPER-5f1c2b")).encode()

    reply = shared_daemon.request("POST", "/v1/identity/scan", body, headers)

    assert reply.status == 415
    detail = reply.json()["detail"]
    assert words in detail
    assert "application/json" in detail


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one response: its status, its headers with lower-case names, and its body.

    The response must be the last bytes the server sent so far, because bytes after its body
    are dropped.
    """
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed after {buffer!r}"
        buffer += chunk
    head, body = buffer.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, value = line.split(":", 1)
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed {length - len(body)} bytes before the body's end"
        body += chunk
    return int(status_line.split(" ", 2)[1]), headers, body


def _http_errors(daemon: Daemon, status: int) -> float:
    samples = labelled_samples(daemon, "identity_connector_http_errors", "status")
    return samples.get(str(status), 0.0)


# Characters of padding that take a scan body past the 16 KiB limit.
OVER_LIMIT = 20_000

# (case, request headers besides Host and Content-Length, characters of padding in the body,
# statuses in the order they arrive, problem type or None). Each body goes out only after a
# 100 Continue, and is made when the test runs, so that its timestamp is not stale.
EXPECT_CASES: list[tuple[str, dict[str, str], int, list[int], str | None]] = [
    (
        "over the limit",
        {"Content-Type": "application/json", "Expect": "100-continue"},
        OVER_LIMIT,
        [413],
        "body-too-large",
    ),
    (
        "not json",
        {"Content-Type": "text/plain", "Expect": "100-continue"},
        0,
        [415],
        "unsupported-media-type",
    ),
    (
        "charset not utf-8",
        {"Content-Type": "application/json; charset=iso-8859-1", "Expect": "100-Continue"},
        0,
        [415],
        "unsupported-media-type",
    ),
    (
        "unknown content-encoding",
        {
            "Content-Type": "application/json",
            "Content-Encoding": "snappy",
            "Expect": "100-continue",
        },
        0,
        [415],
        "unsupported-content-encoding",
    ),
    (
        "good request",
        {"Content-Type": "application/json", "Expect": "100-continue"},
        0,
        [100, 200],
        None,
    ),
    (
        "unknown expectation",
        {"Content-Type": "application/json", "Expect": "x-unknown"},
        OVER_LIMIT,
        [417],
        None,
    ),
]


@pytest.mark.parametrize(
    ("headers", "padding", "statuses", "problem_type"),
    [case[1:] for case in EXPECT_CASES],
    ids=[case[0] for case in EXPECT_CASES],
)
def test_expect_continue_before_body(
    shared_daemon: Daemon,
    headers: dict[str, str],
    padding: int,
    statuses: list[int],
    problem_type: str | None,
) -> None:
    scan = scan_body("KEY-SHOPPER-5f1c2b")
    body = json.dumps({**scan, "pad": "p" * padding} if padding else scan).encode()
    errors_before = _http_errors(shared_daemon, statuses[-1])
    head = "POST /v1/identity/scan HTTP/1.1\r\nHost: x\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    head += f"Content-Length: {len(body)}\r\n\r\n"

    received = []
    with socket.create_connection(("127.0.0.1", shared_daemon.port), timeout=10) as sock:
        sock.sendall(head.encode())
        status, response_headers, response_body = _read_response(sock)
        received.append(status)
        if status == 100:
            sock.sendall(body)
            status, response_headers, response_body = _read_response(sock)
            received.append(status)

    assert received == statuses
    if status >= 400:
        assert _http_errors(shared_daemon, status) == errors_before + 1
    if status == 200:
        assert json.loads(response_body)["action"] == "ACCEPT"
    if problem_type is not None:
        without_expect = {name: value for name, value in headers.items() if name != "Expect"}
        reference = shared_daemon.request("POST", "/v1/identity/scan", body, without_expect)
        assert response_headers["content-type"] == "application/problem+json"
        assert response_headers["connection"] == "close"
        assert json.loads(response_body)["type"].endswith(":" + problem_type)
        assert json.loads(response_body) == reference.json()
    faults = [
        line
        for line in shared_daemon.log_lines()
        if line["event"] in ("request.failed", "http.server_error")
    ]
    assert faults == []
