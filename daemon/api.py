"""The HTTP API: ResolveScan, health, and the OpenAPI document, with problem-details errors."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
import structlog
from aiohttp import HttpVersion11, hdrs, web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    ContentEncodingError,
    ContentLengthError,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
    TransferEncodingError,
)
from aiohttp.web_protocol import RequestPayloadError

from daemon import metrics as metrics_module
from daemon.config import Config
from daemon.local import add_local_routes
from daemon.metrics import Metrics
from daemon.resolver import IdempotencyConflict
from daemon.runtime import Runtime
from daemon.schema import (
    PROBLEM_MEDIA_TYPE,
    BodyInvalid,
    FieldError,
    Problem,
    RequestInvalid,
    decode_request,
    encode_problem,
    openapi_document,
)
from daemon.security import ADMISSION_KEY, Admission, LogThrottle, admission_middleware
from daemon.store import CommitFailed, StoreWriter, write_probe

log = structlog.get_logger(__name__)

SCAN_PATH = "/v1/identity/scan"
PROBLEM_TYPE_PREFIX = "urn:identity-connector:problem:"

RUNTIME_KEY = web.AppKey("runtime", Runtime)
METRICS_KEY = web.AppKey("metrics", Metrics)
OPENAPI_KEY = web.AppKey("openapi", bytes)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def problem_response(
    status: int,
    slug: str,
    title: str,
    detail: str,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """Build an RFC 9457 problem-details response."""
    problem = Problem(
        type=PROBLEM_TYPE_PREFIX + slug, title=title, status=status, detail=detail, errors=errors
    )
    return web.Response(
        status=status,
        # The status line repeats the title: Python's table still calls 422
        # "Unprocessable Entity", the name RFC 9110 replaced with "Unprocessable Content".
        reason=title,
        body=encode_problem(problem),
        content_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


_HTTP_PROBLEMS: dict[int, tuple[str, str]] = {
    404: ("not-found", "no such resource: the ResolveScan endpoint is POST " + SCAN_PATH),
    405: ("method-not-allowed", "method {method} is not allowed on {path}; use {allowed}"),
    413: ("body-too-large", "the request body exceeds the {limit}-byte limit"),
}


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into problem details; an unexpected exception becomes a bare 500."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _http_error_problem(request, exc)
    except RequestPayloadError as exc:
        # The body's Content-Encoding or chunked framing is broken: the client's fault.
        reason = _describe_payload_fault(exc)
        _log_invalid_request(request, "invalid-body", reason=reason)
        response = problem_response(
            400,
            "invalid-body",
            "Bad Request",
            f"the request body could not be read: {reason}; send it as plain JSON or with a"
            " Content-Encoding that matches its bytes",
        )
    except ConnectionResetError:
        # The client closed the connection before its body arrived, so no response can reach
        # it: not a server fault, and not counted as an HTTP error.
        log.info("request.client_disconnected", method=request.method, path=request.path)
        return web.Response(status=400)
    except Exception:
        log.exception("request.failed", method=request.method, path=request.path)
        response = _internal_error()
    if response.status >= 400:
        request.app[METRICS_KEY].count_http_error(response.status)
    return response


def _internal_error() -> web.Response:
    """Build the 500 response, which names no internals."""
    return problem_response(
        500,
        "internal-error",
        "Internal Server Error",
        "the connector failed to process the request; the cause is in its log",
    )


_INVALID_LOG_THROTTLE = LogThrottle(60.0)


def _log_invalid_request(
    request: web.Request, problem: str, fields: list[str] | None = None, **extra: object
) -> None:
    """Log a rejected request once a minute per path, problem and fields, with a repeat count.

    A gateway configured with the wrong storeId or an outdated contract receives only 4xx
    responses, and without this line the journal would not show it.
    """
    key = f"{request.path} {problem} {','.join(fields or ())} {extra.get('store_id', '')}"
    suppressed = _INVALID_LOG_THROTTLE.admit(key)
    if suppressed is not None:
        log.warning(
            "request.invalid",
            path=request.path,
            problem=problem,
            fields=fields,
            suppressed=suppressed,
            **extra,
        )


class _ServerLogHandler(logging.Handler):
    """Write the records of aiohttp's server logger as structured events, one line each.

    aiohttp's HTTP parser rejects a malformed request before any handler runs, responds with
    its own plain-text 400, and logs the exception. That exception's message quotes the
    request bytes, a scanned value among them, and Python's fallback handler would write it
    to standard error as a traceback over many lines. The log record is the only trace of
    that 400, so this handler also counts it in the metrics.
    """

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, RequestPayloadError):
            # After a handler responds, aiohttp reads the rest of the body and drops it. A body
            # that the client broke (a Content-Encoding that does not match its bytes, broken
            # chunked framing) fails again there, after the middleware has sent its 400.
            _log_client_payload_error(error)
        elif isinstance(error, HttpProcessingError):
            # aiohttp responds with 400 to every request that its parser rejects.
            self.metrics.count_http_error(400)
            _log_unparsable_request(record, error)
        elif record.levelno <= logging.DEBUG:
            log.debug("http.server_debug", message=record.getMessage())
        else:
            log.error("http.server_error", message=record.getMessage(), exc_info=record.exc_info)


# Fixed descriptions of the faults that aiohttp's HTTP parser reports, by exception class. A
# subclass's entry takes precedence over its base class's.
_PARSER_FAULTS: dict[type[HttpProcessingError], str] = {
    HttpProcessingError: "malformed request",
    BadHttpMessage: "malformed request",
    BadStatusLine: "invalid request line",
    BadHttpMethod: "invalid method in the request line",
    InvalidURLError: "invalid request target",
    LineTooLong: "request line or header longer than the limit",
    InvalidHeader: "invalid header",
    PayloadEncodingError: "invalid body framing",
    ContentEncodingError: "body that does not match its Content-Encoding",
    TransferEncodingError: "invalid chunked body",
    ContentLengthError: "body shorter than its Content-Length",
}

# (exception class, start of a message that aiohttp or llhttp writes as a constant, description).
# Only these constant starts select a description, because the text after them can be request
# bytes.
_PARSER_FAULT_MESSAGES: tuple[tuple[type[HttpProcessingError], str, str], ...] = (
    (BadHttpMethod, "Received HTTPS traffic on an HTTP port", "TLS handshake on a plain-HTTP port"),
    (
        BadHttpMessage,
        "Transfer-Encoding can't be present with Content-Length",
        "both Content-Length and Transfer-Encoding",
    ),
    (
        BadHttpMessage,
        "Content-Length can't be present with Transfer-Encoding",
        "both Content-Length and Transfer-Encoding",
    ),
    (BadHttpMessage, "Request has invalid `Transfer-Encoding`", "invalid Transfer-Encoding"),
    (BadHttpMessage, "Invalid `Transfer-Encoding` header value", "invalid Transfer-Encoding"),
    (BadHttpMessage, "Too many headers received", "too many headers"),
    (BadHttpMessage, "Too many trailers received", "too many trailers"),
    (BadHttpMessage, "Missing 'Host' header in request.", "missing Host header"),
    (BadHttpMessage, "Duplicate Content-Length", "repeated Content-Length"),
    (BadHttpMessage, "Duplicate '", "repeated header that may appear only once"),
    (BadHttpMessage, "Invalid character in Content-Length", "invalid Content-Length"),
    (BadHttpMessage, "Empty Content-Length", "invalid Content-Length"),
    (BadHttpMessage, "Content-Length overflow", "invalid Content-Length"),
    (BadHttpMessage, "Invalid header token", "invalid character in a header name"),
    (BadHttpMessage, "Invalid header field char", "invalid character in a header name"),
    (BadHttpMessage, "Invalid header value char", "invalid character in a header value"),
    (BadHttpMessage, "Invalid character in chunk size", "invalid chunk size"),
    (BadHttpMessage, "Chunk size overflow", "invalid chunk size"),
    (BadHttpMessage, "Bad line ending, expected CRLF", "line ending other than CRLF"),
    (
        ContentEncodingError,
        "Can not decode content-encoding: brotli",
        "Content-Encoding br, which aiohttp cannot decode without the Brotli package",
    ),
    (
        ContentEncodingError,
        "Can not decode content-encoding: zstandard",
        "Content-Encoding zstd, which aiohttp cannot decode without a zstd package",
    ),
)


def _describe_parser_fault(error: HttpProcessingError) -> str:
    """Return a fixed description of a parser fault, which never contains request bytes.

    aiohttp's messages quote the request. InvalidURLError's message is the request target
    itself, and llhttp's quote the bytes around the fault, so the description depends only on
    the exception class and on the constant start of a known message.
    """
    message = error.message.lstrip()
    for error_class, start, description in _PARSER_FAULT_MESSAGES:
        if type(error) is error_class and message.startswith(start):
            return description
    for error_class in type(error).__mro__:
        if error_class in _PARSER_FAULTS:
            return _PARSER_FAULTS[error_class]
    return _PARSER_FAULTS[HttpProcessingError]


def _log_unparsable_request(record: logging.LogRecord, error: HttpProcessingError) -> None:
    reason = _describe_parser_fault(error)
    client = record.args[0] if isinstance(record.args, tuple) and record.args else None
    key = f"unparsable {type(error).__name__} {reason}"
    suppressed = _INVALID_LOG_THROTTLE.admit(key)
    if suppressed is not None:
        log.warning(
            "request.invalid",
            problem="unparsable-request",
            client=str(client),
            error=type(error).__name__,
            reason=reason,
            suppressed=suppressed,
        )


def _log_client_payload_error(error: RequestPayloadError) -> None:
    # The client already got the middleware's 400, which it logs as request.invalid, so this
    # line is only for debugging. The message of RequestPayloadError repeats its cause's, so
    # the line has the cause's class and fixed description in place of either message.
    log.debug(
        "http.client_payload_error",
        error=type(error.__cause__ or error).__name__,
        reason=_describe_payload_fault(error),
    )


def _describe_payload_fault(error: RequestPayloadError) -> str:
    """Return a fixed description of a body that could not be read, without its bytes.

    aiohttp's message can quote the body, so the description comes from the cause's class.
    """
    cause = error.__cause__
    if isinstance(cause, HttpProcessingError):
        return _describe_parser_fault(cause)
    return "body framing or encoding that could not be read"


def _http_server_logger(metrics: Metrics) -> logging.Logger:
    """Create the logger for aiohttp's request handler, which writes through structlog.

    Each application gets a logger of its own, so that its handler counts into that
    application's metrics. The logger is not registered with logging.getLogger, which would
    keep every logger it creates until the process exits.
    """
    # aiohttp logs a client that speaks no HTTP (a TLS handshake on a plain port) at DEBUG.
    logger = logging.Logger(f"{__name__}.http_server", logging.DEBUG)
    logger.propagate = False
    logger.addHandler(_ServerLogHandler(metrics))
    return logger


def _config(request: web.Request) -> Config:
    return request.app[RUNTIME_KEY].config


def _http_error_problem(request: web.Request, exc: web.HTTPException) -> web.Response:
    config = _config(request)
    slug, template = _HTTP_PROBLEMS.get(exc.status, ("http-error", exc.reason))
    allowed = ""
    headers = {}
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        headers["Allow"] = allowed
    detail = template.format(
        method=request.method,
        path=request.path,
        allowed=allowed,
        limit=config.server.max_body_size,
    )
    if exc.status == 413:
        # A gateway whose bodies outgrow the limit leaves a trace in the log, as 400 and 415 do.
        _log_invalid_request(request, slug, limit=config.server.max_body_size)
    return problem_response(exc.status, slug, exc.reason, detail, headers=headers)


def _is_json(content_type: str) -> bool:
    """Tell whether a lower-case media type is application/json or ends in the +json suffix."""
    if content_type == "application/json":
        return True
    subtype = content_type.removeprefix("application/")
    return subtype != content_type and subtype.endswith("+json") and subtype != "+json"


# Content codings of the request body that the API accepts, which aiohttp's parser decodes
# before the handler reads the body. aiohttp 3.14 also decodes br when the Brotli package is
# installed and zstd when compression.zstd (Python 3.14) or backports.zstd is, and rejects
# them with its own 400 otherwise. The API accepts neither, whatever is installed.
ACCEPTED_CODINGS = frozenset({"gzip", "deflate"})
ACCEPT_ENCODING = "gzip, deflate"


def _unsupported_coding(request: web.Request) -> str | None:
    """Return the Content-Encoding of a body whose coding the API does not accept, if any.

    aiohttp passes a body with a coding that it does not know on as it came, so without this
    check an unknown coding would reach the JSON decoder.
    """
    values = request.headers.getall("Content-Encoding", [])
    if not values:
        return None
    if len(values) == 1 and values[0].isascii() and values[0].lower() in ACCEPTED_CODINGS:
        return None
    codings = {coding.strip().lower() for value in values for coding in value.split(",")}
    if codings <= {"identity", ""}:
        return None
    return ", ".join(values)


def _unsupported_media_type(request: web.Request) -> web.Response | None:
    """Return a 415 response when the body is not JSON in UTF-8, or its coding is unknown."""
    if not _is_json(request.content_type):
        sent = request.headers.get("Content-Type")
        if sent is None:
            detail = "the request has no Content-Type header; send Content-Type: application/json"
        else:
            detail = (
                f"Content-Type {sent[:100]!r} is not supported; send Content-Type: application/json"
            )
        _log_invalid_request(
            request, "unsupported-media-type", content_type=None if sent is None else sent[:100]
        )
        return problem_response(415, "unsupported-media-type", "Unsupported Media Type", detail)

    charset = request.charset
    if charset is not None and charset.lower() not in ("utf-8", "utf8"):
        # RFC 8259 makes UTF-8 the only encoding of JSON between systems.
        _log_invalid_request(request, "unsupported-media-type", charset=charset[:40])
        return problem_response(
            415,
            "unsupported-media-type",
            "Unsupported Media Type",
            f"charset {charset[:40]!r} is not supported; send the JSON body in UTF-8",
        )

    coding = _unsupported_coding(request)
    if coding is not None:
        _log_invalid_request(request, "unsupported-content-encoding", content_encoding=coding[:40])
        return problem_response(
            415,
            "unsupported-content-encoding",
            "Unsupported Media Type",
            f"Content-Encoding {coding[:40]!r} is not supported; send the body uncompressed,"
            f" or compressed with one of: {ACCEPT_ENCODING}",
            headers={"Accept-Encoding": ACCEPT_ENCODING},
        )
    return None


def _reject_by_headers(request: web.Request) -> web.Response | None:
    """Return the 415 or 413 response for a scan request whose headers rule out its body."""
    unsupported = _unsupported_media_type(request)
    if unsupported is not None:
        return unsupported

    limit = _config(request).server.max_body_size
    if request.content_length is not None and request.content_length > limit:
        too_large = web.HTTPRequestEntityTooLarge(
            max_size=limit, actual_size=request.content_length
        )
        return _http_error_problem(request, too_large)
    return None


async def expect_scan_body(request: web.Request) -> web.StreamResponse | None:
    """Send 100 Continue to a ResolveScan request, or the 413 or 415 that its headers decide.

    On a listener without admission checks (no [auth] or [tls]), a request with
    `Expect: 100-continue` whose headers already give it a 413 or 415 gets that response in
    place of 100 Continue, so its client need not send the body. The response carries
    `Connection: close`, because the client may or may not send the announced body and the
    server could not tell a next request from it. With admission checks, a client is admitted
    before it learns anything about its request, so it gets 100 Continue and the checks run
    once the body is in. An expectation other than 100-continue gets 417, as aiohttp's own
    handler gives. aiohttp calls this handler before the middlewares, so it counts its own
    error responses.
    """
    metrics = request.app[METRICS_KEY]
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version != HttpVersion11:
        return None
    if expect.lower() != "100-continue":
        metrics.count_http_error(417)
        raise web.HTTPExpectationFailed(
            text=f"Expect {expect[:100]!r} is not supported; send Expect: 100-continue or none"
        )
    if request.app[ADMISSION_KEY].state.auth is None:
        rejected = _reject_by_headers(request)
        if rejected is not None:
            rejected.force_close()
            metrics.count_http_error(rejected.status)
            return rejected
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    # The interim response is not part of the response body's size.
    request.writer.output_size = 0
    return None


async def resolve_scan(request: web.Request) -> web.Response:
    started = time.perf_counter()
    config = _config(request)

    rejected = _reject_by_headers(request)
    if rejected is not None:
        return rejected
    body = await request.read()

    try:
        scan_request = decode_request(body)
    except BodyInvalid as exc:
        _log_invalid_request(request, "invalid-body")
        return problem_response(400, "invalid-body", "Bad Request", str(exc))
    except RequestInvalid as exc:
        _log_invalid_request(request, "invalid-request", [error.field for error in exc.errors])
        return _invalid(exc.errors)

    if scan_request.storeId not in config.stores.ids:
        _log_invalid_request(
            request, "invalid-request", ["storeId"], store_id=scan_request.storeId[:100]
        )
        return _invalid(
            [
                FieldError(
                    field="storeId",
                    message=f"store {scan_request.storeId!r} is not served by this connector;"
                    f" it serves {', '.join(config.stores.ids)}",
                )
            ]
        )

    try:
        response_body, _replayed = await request.app[RUNTIME_KEY].resolver.resolve(
            scan_request, started
        )
    except IdempotencyConflict:
        return problem_response(
            422,
            "idempotency-conflict",
            "Unprocessable Content",
            f"scanEvent.id {scan_request.scanEvent.id} was already decided for a different"
            " storeId, location, channel or value; send a new scanEvent.id for a new scan",
        )
    except CommitFailed as exc:
        # The writer logs the storage fault once as store.commit_failed, so a traceback on
        # every request would only repeat it.
        log.error(
            "request.failed",
            method=request.method,
            path=request.path,
            request_id=scan_request.requestId,
            scan_event_id=scan_request.scanEvent.id,
            error=str(exc),
            detail="the decision was not recorded; store.commit_failed has the cause",
        )
        return _internal_error()
    return web.Response(body=response_body, content_type="application/json")


def _invalid(errors: list[FieldError]) -> web.Response:
    fields = ", ".join(error.field for error in errors)
    return problem_response(
        400,
        "invalid-request",
        "Bad Request",
        f"the request body breaks the ResolveScan contract in: {fields}",
        errors=errors,
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "up"})


_HEALTH_LOG_THROTTLE = LogThrottle(60.0)
# Seconds /readyz waits for its probe commit.
READY_PROBE_SECONDS = 2.0
# Seconds after the last commit of a decision or probe from which /readyz commits a probe of
# its own, so it notices a full disk while no decision comes in.
READY_PROBE_INTERVAL = 2.0


def _probe_due(writer: StoreWriter) -> bool:
    """Tell whether /readyz must commit a probe to know that decisions commit."""
    if writer.failure is not None or writer.proved_at is None:
        return True
    return time.monotonic() - writer.proved_at >= READY_PROBE_INTERVAL


async def readyz(request: web.Request) -> web.Response:
    resolver = request.app[RUNTIME_KEY].resolver
    store = resolver.store
    try:
        store.reader.connection.execute("SELECT 1 FROM identities LIMIT 1").fetchall()
        database_ok = store.writer.alive
        if database_ok and _probe_due(store.writer):
            # The probe writes and deletes the rows of a decision, so it notices a full disk
            # with no traffic, and its commit ends the writer's failure.
            await asyncio.wait_for(store.writer.submit(write_probe()), READY_PROBE_SECONDS)
            database_ok = store.writer.failure is None
    except Exception as exc:  # the reason goes to the log, not to the caller
        if isinstance(exc, TimeoutError):
            error = (
                f"the probe commit did not finish within {READY_PROBE_SECONDS:g} s; another"
                " process may hold the database's write lock, or a long job keeps the"
                " writer busy"
            )
        else:
            error = str(exc) or type(exc).__name__
        # A probe polls every few seconds, so one line a minute is enough.
        suppressed = _HEALTH_LOG_THROTTLE.admit("health.database_failed")
        if suppressed is not None:
            log.warning("health.database_failed", error=error, suppressed=suppressed)
        database_ok = False
    if not database_ok:
        return web.json_response({"status": "not ready"}, status=503)
    cache = "stale" if resolver.cache_stale(time.time()) else "fresh"
    return web.json_response({"status": "ready", "cache": cache})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI_KEY], content_type="application/json")


def openapi_bytes() -> bytes:
    """Serialise the OpenAPI document the way docs/openapi.json stores it."""
    return msgspec.json.format(msgspec.json.encode(openapi_document()), indent=2) + b"\n"


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": metrics_module.CONTENT_TYPE})


async def _close_connection_while_stopping(
    request: web.Request, response: web.StreamResponse
) -> None:
    """Send `Connection: close` on every response once the daemon begins to stop.

    The client then sends its next request on a new connection, which the closed listener
    refuses, instead of on one that the drain closes. aiohttp (3.14) fires
    on_response_prepare after it has set the Connection header, so this replaces the
    header, and force_close makes aiohttp close the connection after the response.
    """
    if request.app[ADMISSION_KEY].stopping.is_set():
        response.force_close()
        response.headers[hdrs.CONNECTION] = "close"


def build_app(runtime: Runtime, metrics_registry: Metrics) -> web.Application:
    # Admission runs inside problem_middleware, so its 401/403/429 responses are counted too.
    app = web.Application(
        middlewares=[problem_middleware, admission_middleware],
        client_max_size=runtime.config.server.max_body_size,
        handler_args={"logger": _http_server_logger(metrics_registry)},
    )
    app[RUNTIME_KEY] = runtime
    admission = Admission(runtime.config, problem_response)
    app[ADMISSION_KEY] = admission

    def listener_certificate() -> bytes | None:
        material = admission.state.tls_material
        return material.chain if material is not None else None

    runtime.certificates["gateway_tls"] = listener_certificate
    app[METRICS_KEY] = metrics_registry
    app[OPENAPI_KEY] = openapi_bytes()
    app.router.add_post(SCAN_PATH, resolve_scan, expect_handler=expect_scan_body)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/metrics", metrics)
    app.on_response_prepare.append(_close_connection_while_stopping)
    add_local_routes(app, runtime)
    return app


if __name__ == "__main__":
    import sys

    sys.stdout.buffer.write(openapi_bytes())
