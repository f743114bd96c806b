"""Client faults get client-error responses and log lines, never those of a server fault."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time
from collections.abc import Callable

import pytest

from tests.conftest import Daemon, exchange, labelled_samples, scan_body

SCAN_HEADERS = b"POST /v1/identity/scan HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


# request.failed comes from the daemon's handlers, http.server_error from aiohttp's own.
SERVER_FAULT_EVENTS = {"request.failed", "http.server_error"}


def server_faults(daemon: Daemon) -> list[dict]:
    return [line for line in daemon.log_lines() if line["event"] in SERVER_FAULT_EVENTS]


def wait_for_event(daemon: Daemon, event: str, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in daemon.log_lines() if line["event"] == event]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def http_errors_500(daemon: Daemon) -> float:
    samples = labelled_samples(daemon, "identity_connector_http_errors", "status")
    return samples.get("500", 0.0)


def _with_content_length(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def _chunked(body: bytes) -> bytes:
    return b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"


@pytest.mark.parametrize("frame", [_with_content_length, _chunked], ids=["length", "chunked"])
def test_gzip_header_on_plain_body_is_400(daemon: Daemon, frame: Callable[[bytes], bytes]) -> None:
    body = json.dumps(scan_body("KEY-SHOPPER-5f1c2b")).encode()
    request = SCAN_HEADERS + b"Content-Encoding: gzip\r\n" + frame(body)

    # After its response aiohttp reads the rest of the body, which fails again, and it closes
    # the connection only once it has logged that failure.
    head, _, payload = exchange(daemon, request).partition(b"\r\n\r\n")

    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"\r\nContent-Type: application/problem+json" in head
    problem = json.loads(payload)
    assert problem["type"].endswith(":invalid-body")
    assert problem["detail"].startswith(
        "the request body could not be read: body that does not match its Content-Encoding;"
    )
    assert server_faults(daemon) == []
    assert [line["event"] for line in daemon.log_lines() if "exception" in line] == []
    assert http_errors_500(daemon) == 0


def close_mid_body(sock: socket.socket) -> None:
    sock.close()


def reset_mid_body(sock: socket.socket) -> None:
    # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


@pytest.mark.parametrize("hang_up", [close_mid_body, reset_mid_body], ids=["close", "reset"])
def test_client_gone_mid_body_is_not_a_fault(
    daemon: Daemon, hang_up: Callable[[socket.socket], None]
) -> None:
    body = json.dumps(scan_body("KEY-SHOPPER-5f1c2b")).encode()
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    sock.sendall(SCAN_HEADERS + b"Content-Length: %d\r\n\r\n" % len(body) + body[:30])
    time.sleep(0.2)

    hang_up(sock)

    assert wait_for_event(daemon, "request.client_disconnected"), "no disconnect line"
    assert server_faults(daemon) == []
    assert http_errors_500(daemon) == 0
    assert daemon.scan("KEY-SHOPPER-5f1c2b").status == 200


def test_unserved_store_logged_once_a_minute(daemon: Daemon) -> None:
    replies = [daemon.scan("KEY-SHOPPER-5f1c2b", store="STORE-999") for _ in range(3)]

    lines = wait_for_event(daemon, "request.invalid")

    assert [reply.status for reply in replies] == [400] * 3
    assert len(lines) == 1
    assert lines[0]["fields"] == ["storeId"]
    assert lines[0]["store_id"] == "STORE-999"
    assert lines[0]["level"] == "warning"


def test_invalid_body_log_names_fields_only(daemon: Daemon) -> None:
    body = scan_body("SECRET-VALUE-7a3e")
    body["scanEvent"]["channel"] = "LASER"

    reply = daemon.post_json(body)

    assert reply.status == 400
    lines = wait_for_event(daemon, "request.invalid")
    assert len(lines) == 1
    assert lines[0]["fields"] == ["scanEvent.channel"]
    assert "SECRET-VALUE-7a3e" not in daemon.log_path.read_text(encoding="utf-8")


def test_conflict_status_line_matches_title(daemon: Daemon) -> None:
    first = scan_body("KEY-SHOPPER-5f1c2b")
    second = scan_body("KEY-SHOPPER-other", scan_id=first["scanEvent"]["id"])
    assert daemon.post_json(first).status == 200
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    try:
        connection.request(
            "POST",
            "/v1/identity/scan",
            json.dumps(second).encode(),
            {"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        problem = json.loads(response.read())
    finally:
        connection.close()

    assert response.status == 422
    assert response.reason == "Unprocessable Content"
    assert problem["title"] == response.reason


def test_byte_order_mark_before_body_ignored(daemon: Daemon) -> None:
    body = b"\xef\xbb\xbf" + json.dumps(scan_body("KEY-SHOPPER-5f1c2b")).encode()

    reply = daemon.request("POST", "/v1/identity/scan", body, {"Content-Type": "application/json"})

    assert reply.status == 200
    assert reply.json()["action"] == "ACCEPT"


# (Content-Type, status): JSON travels in UTF-8 only (RFC 8259), with or without the parameter.
CHARSET_CASES = [
    ("application/json; charset=utf-8", 200),
    ("application/json; charset=UTF-8", 200),
    ("application/json", 200),
    ("application/json; charset=iso-8859-1", 415),
    ("application/json; charset=utf-16", 415),
]


@pytest.mark.parametrize(("content_type", "status"), CHARSET_CASES)
def test_charset_other_than_utf8_is_415(
    shared_daemon: Daemon, content_type: str, status: int
) -> None:
    reply = shared_daemon.post_json(scan_body("KEY-SHOPPER-5f1c2b"), content_type=content_type)

    assert reply.status == status


# (field, a JSON number too large for msgspec): valid JSON, so the response names the field.
HUGE_NUMBERS = [
    ("scanEvent.value", "9" * 3000),
    ("requestId", "1e99999"),
]


@pytest.mark.parametrize(("field", "number"), HUGE_NUMBERS, ids=["integer", "exponent"])
def test_huge_number_names_field(shared_daemon: Daemon, field: str, number: str) -> None:
    body = scan_body("KEY-SHOPPER-5f1c2b")
    if field == "requestId":
        body["requestId"] = "NUMBER"
    else:
        body["scanEvent"]["value"] = "NUMBER"
    raw = json.dumps(body).replace('"NUMBER"', number).encode()

    reply = shared_daemon.request(
        "POST", "/v1/identity/scan", raw, {"Content-Type": "application/json"}
    )

    assert reply.status == 400
    assert field in [error["field"] for error in reply.json()["errors"]]


def test_body_on_its_way_at_stop_gets_503(daemon: Daemon) -> None:
    # The stop sends its 503 for a request whose body is still on its way at once, without
    # waiting for the body or for client_timeout.
    assert daemon.process is not None
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    sock.sendall(SCAN_HEADERS + b"Content-Length: 300\r\n\r\n")
    time.sleep(0.3)
    started = time.monotonic()

    daemon.process.send_signal(signal.SIGTERM)
    received = sock.recv(65536)
    answered_after = time.monotonic() - started
    sock.close()

    assert daemon.stop() == 0
    assert received.startswith(b"HTTP/1.1 503")
    assert b":stopping" in received
    # client_timeout is 10 s: the response must not wait for it.
    assert answered_after < 5


SECRET_VALUE = "SECRET-VALUE-7a3e"


def _body_as_chunk_size(body: bytes) -> bytes:
    return SCAN_HEADERS + b"Transfer-Encoding: chunked\r\n\r\n" + body + b"\r\n0\r\n\r\n"


def _bare_line_feeds(body: bytes) -> bytes:
    head = SCAN_HEADERS + b"Content-Length: %d\r\n\r\n" % len(body)
    return head.replace(b"\r\n", b"\n") + body


def _header_over_limit(body: bytes) -> bytes:
    # aiohttp's error message quotes the start of the header line that is too long.
    header = b"X-Scan: " + body + b"x" * 9000 + b"\r\n"
    return SCAN_HEADERS + header + b"Content-Length: %d\r\n\r\n" % len(body) + body


def _value_in_request_target(body: bytes) -> bytes:
    # The message of aiohttp's InvalidURLError is the request target itself, unquoted.
    return b"GET http://%s:abc/ HTTP/1.1\r\nHost: x\r\n\r\n" % SECRET_VALUE.encode()


def _value_in_header_name(body: bytes) -> bytes:
    header = SECRET_VALUE.encode() + b" x: 1\r\n"
    return SCAN_HEADERS + header + b"Content-Length: %d\r\n\r\n" % len(body) + body


# (case id, request built from a body that contains SECRET_VALUE, reason logged). aiohttp's
# HTTP parser rejects these requests before any handler runs, and the message of its
# exception contains request bytes.
UNPARSABLE_REQUESTS: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("body as chunk size", _body_as_chunk_size, "invalid chunk size"),
    ("bare line feeds", _bare_line_feeds, "invalid request line"),
    ("header over limit", _header_over_limit, "request line or header longer than the limit"),
    ("value in request target", _value_in_request_target, "invalid request target"),
    ("value in header name", _value_in_header_name, "invalid character in a header name"),
]


@pytest.mark.parametrize(
    ("build", "reason"),
    [case[1:] for case in UNPARSABLE_REQUESTS],
    ids=[case[0] for case in UNPARSABLE_REQUESTS],
)
def test_unparsable_request_logged_one_line(
    daemon: Daemon, build: Callable[[bytes], bytes], reason: str
) -> None:
    body = json.dumps(scan_body(SECRET_VALUE)).encode()

    received = exchange(daemon, build(body))

    lines = wait_for_event(daemon, "request.invalid")
    assert received.startswith(b"HTTP/1.")
    assert b" 400 " in received.split(b"\r\n", 1)[0]
    assert [line["raw"] for line in daemon.log_lines() if line["event"] == "(not json)"] == []
    assert SECRET_VALUE.lower() not in daemon.log_path.read_text(encoding="utf-8").lower()
    assert len(lines) == 1
    assert lines[0]["problem"] == "unparsable-request"
    assert lines[0]["reason"] == reason
    assert daemon.scan("KEY-SHOPPER-5f1c2b").status == 200
