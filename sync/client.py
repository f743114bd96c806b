"""HTTP client for the HQ sync contract: changes, snapshot, digest, lookup and events."""

from __future__ import annotations

import errno
import gzip
import ssl
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import msgspec
import structlog

from sync.clock import ClockEstimator
from sync.errors import (
    CursorExpired,
    HqAuthFailed,
    HqBodyIncomplete,
    HqError,
    HqRedirected,
    HqResponseInvalid,
    HqStatusError,
    HqUnreachable,
)
from sync.settings import SyncSettings
from sync.state import HqHealth
from sync.store import Change

log = structlog.get_logger(__name__)

T = TypeVar("T")

CURSOR_HEADER = "Identity-Cursor"
COUNT_HEADER = "Identity-Count"
USER_AGENT = "identity-connector"
# A valid record is a few KiB at most (its key is at most 1000 characters).
MAX_SNAPSHOT_LINE_BYTES = 65536
# Bytes a changes page may take per change that its ``limit`` allows. MAX_JSON_BODY_BYTES
# more are allowed for the envelope, and the daemon stops reading a longer body.
MAX_CHANGE_BYTES = MAX_SNAPSHOT_LINE_BYTES
# Maximum body of a digest, lookup or events response, and of a changes page's envelope.
MAX_JSON_BODY_BYTES = 1_048_576
# Characters of a body that is not JSON (such as an HTML error page) quoted in the error.
BODY_START_CHARS = 80
# Statuses whose Retry-After header the retry delay honours.
RETRY_AFTER_STATUSES = frozenset({429, 503})
# Statuses a gateway or load balancer in front of HQ returns when HQ itself is down; they
# count towards the offline state like a refused connection.
UNAVAILABLE_STATUSES = frozenset({502, 503, 504})


class _Put(msgspec.Struct, tag_field="op", tag="PUT"):
    record: dict[str, Any]


class _Remove(msgspec.Struct, tag_field="op", tag="REMOVE"):
    credentialId: str


class _ChangesPage(msgspec.Struct):
    cursor: str
    hasMore: bool
    changes: list[_Put | _Remove]


class Digest(msgspec.Struct, frozen=True):
    """HQ's reconciliation digest at ``cursor``."""

    cursor: str
    count: int
    digest: str


class _LookupAnswer(msgspec.Struct):
    record: dict[str, Any]


class _EventsAnswer(msgspec.Struct):
    accepted: list[str]


@dataclass(frozen=True, slots=True)
class ChangesPage:
    cursor: str
    has_more: bool
    changes: list[Change]


class SnapshotStream:
    """An open snapshot response: its cursor and its records, read in blocks of lines."""

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        cursor: str,
        expected_count: int | None,
        read_timeout: float | None = None,
    ) -> None:
        self.cursor = cursor
        self.expected_count = expected_count
        self.received = 0
        self._response = response
        # The session's sock_read timeout ([hq] request_timeout), named in the error.
        self._read_timeout = read_timeout

    async def blocks(self, lines_per_block: int) -> AsyncIterator[tuple[int, bytes]]:
        """Yield (number of the first line, complete lines) blocks of the stream.

        Each block holds at least ``lines_per_block`` lines, the last one fewer, and every
        line ends with its newline. The caller checks the lines themselves. Raise HqError
        when the stream is cut, stalls, or contains a line longer than MAX_SNAPSHOT_LINE_BYTES.
        At most one block and one line are held, so memory stays constant whatever the
        snapshot's size.
        """
        parts: list[bytes] = []
        tail = b""
        first_line = 1
        lines = 0
        try:
            async for chunk in self._response.content.iter_any():
                end = chunk.rfind(b"\n") + 1
                if end == 0:
                    tail += chunk
                else:
                    parts.append(tail)
                    parts.append(chunk[:end])
                    lines += chunk.count(b"\n", 0, end)
                    tail = chunk[end:]
                if len(tail) > MAX_SNAPSHOT_LINE_BYTES:
                    raise HqResponseInvalid(
                        f"snapshot line {first_line + lines} is longer than"
                        f" {MAX_SNAPSHOT_LINE_BYTES} bytes"
                    )
                if lines >= lines_per_block:
                    yield first_line, b"".join(parts)
                    parts = []
                    first_line += lines
                    lines = 0
        except TimeoutError:
            raise HqUnreachable(
                f"HQ snapshot stream timed out: {_no_data_for(self._read_timeout)} after"
                f" {first_line + lines - 1} complete lines"
            ) from None
        except aiohttp.ClientError as exc:
            raise _body_incomplete(
                "snapshot", self._response, exc, f" after {first_line + lines - 1} complete lines"
            ) from None
        if tail:
            raise HqResponseInvalid(
                f"snapshot truncated: line {first_line + lines} ends without a newline"
            )
        if lines:
            yield first_line, b"".join(parts)

    def check_count(self, received: int) -> None:
        """Raise HqResponseInvalid when ``received`` records differ from the announced count."""
        self.received = received
        if self.expected_count is not None and received != self.expected_count:
            raise HqResponseInvalid(
                f"snapshot has {received} records, but its {COUNT_HEADER} header announced"
                f" {self.expected_count}"
            )


class HqClient:
    """One aiohttp session to HQ; every call reports to ``health`` whether HQ sent a response.

    Whether the work succeeded (a page applied, a rebuild finished, events accepted) is
    reported by the loops, so an HQ that returns 200 with a broken body shows as degraded.
    Redirects are not followed (see HqRedirected).
    """

    def __init__(self, settings: SyncSettings, health: HqHealth, clock: ClockEstimator) -> None:
        self.settings = settings
        self.health = health
        self.clock = clock
        self._session: aiohttp.ClientSession | None = None
        # Whether the last call got an HTTP response: then a TLS handshake worked, and a
        # connection closed under the next call is not taken for a rejected certificate.
        self._responded = False
        self._prefix = f"{settings.base_url}/v1/stores/{quote(settings.store_id, safe='')}"

    async def open(self) -> None:
        if self._session is not None:
            return
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "gzip"}
        if self.settings.token:
            headers["Authorization"] = f"Bearer {self.settings.token}"
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self.settings.request_timeout,
            sock_read=self.settings.request_timeout,
        )
        connector = aiohttp.TCPConnector(ssl=self._ssl_context(), limit=8)
        # trust_env=False: HQ is reached directly, whatever proxy variables the unit has.
        self._session = aiohttp.ClientSession(
            headers=headers, timeout=timeout, connector=connector, trust_env=False
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _ssl_context(self) -> ssl.SSLContext | bool:
        settings = self.settings
        if not settings.base_url.startswith("https://"):
            return True
        context = ssl.create_default_context(cafile=settings.ca_file or None)
        if settings.client_cert_file:
            load_client_certificate(
                context, settings.client_cert_file, settings.client_key_file or None
            )
        return context

    async def changes(self, cursor: str | None, limit: int) -> ChangesPage:
        """Return the next page of the changes feed; raise CursorExpired on 410."""
        params = {"limit": str(limit)}
        if cursor is not None:
            params["cursor"] = cursor

        async def call() -> ChangesPage:
            async with self._request("changes", "GET", "/identities/changes", params=params) as (
                response
            ):
                if response.status == 410:
                    raise CursorExpired("HQ expired the feed cursor (410 Gone)", cursor)
                self._expect(response, "changes", 200)
                max_bytes = MAX_JSON_BODY_BYTES + limit * MAX_CHANGE_BYTES
                page = await self._decode(response, "changes", _ChangesPage, max_bytes)
            _check_page(page, limit)
            return ChangesPage(
                cursor=page.cursor,
                has_more=page.hasMore,
                changes=[_to_change(change) for change in page.changes],
            )

        return await self._observed(call())

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[SnapshotStream]:
        """Open the snapshot stream; the caller reads its records inside the block.

        An HqError raised inside the block (by the stream or the caller) is reported to
        ``health`` once on its way out.
        """
        try:
            async with self._request("snapshot", "GET", "/identities/snapshot") as response:
                self._expect(response, "snapshot", 200)
                cursor = response.headers.get(CURSOR_HEADER)
                if not cursor:
                    raise HqResponseInvalid(f"snapshot response has no {CURSOR_HEADER} header")
                expected = _optional_int(response.headers.get(COUNT_HEADER), COUNT_HEADER)
                stream = SnapshotStream(
                    response, cursor, expected, read_timeout=self.settings.request_timeout
                )
                # HQ has responded. A stream of millions of records takes minutes, and HQ
                # must not count as offline (no online lookups, an alert) until its end.
                self.health.call_answered()
                yield stream
        except HqError as exc:
            raise self._failed(exc) from None

    async def digest(self) -> Digest:
        async def call() -> Digest:
            async with self._request("digest", "GET", "/identities/digest") as response:
                self._expect(response, "digest", 200)
                return await self._decode(response, "digest", Digest)

        return await self._observed(call())

    async def lookup(self, key: str) -> dict[str, Any] | None:
        """Return HQ's record for a scanned key, or None when HQ responds 404."""
        body = msgspec.json.encode({"key": key})

        async def call() -> dict[str, Any] | None:
            async with self._request(
                "lookup",
                "POST",
                "/identities/lookup",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as response:
                if response.status == 404:
                    return None
                self._expect(response, "lookup", 200)
                answer = await self._decode(response, "lookup", _LookupAnswer)
            return answer.record

        return await self._observed(call())

    async def post_events(self, body: bytes) -> list[str]:
        """POST a ``{"events": [...]}`` body; return the event ids HQ accepted."""
        headers = {"Content-Type": "application/json"}
        if self.settings.gzip_uploads:
            body = gzip.compress(body, compresslevel=5)
            headers["Content-Encoding"] = "gzip"

        async def call() -> list[str]:
            async with self._request(
                "events", "POST", "/events", data=body, headers=headers
            ) as response:
                self._expect(response, "events", 200)
                answer = await self._decode(response, "events", _EventsAnswer)
            return answer.accepted

        return await self._observed(call())

    async def _observed(self, call: Awaitable[T]) -> T:
        try:
            result = await call
        except HqError as exc:
            raise self._failed(exc) from None
        self.health.call_answered()
        return result

    def _failed(self, error: HqError) -> HqError:
        if error.reachable:
            self.health.call_answered()
        else:
            self.health.call_unanswered(error)
        return error

    @asynccontextmanager
    async def _request(
        self, call: str, method: str, path: str, **kwargs: Any
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        if self._session is None:
            raise RuntimeError("HqClient.open() was not called")
        url = self._prefix + path
        sent_at = time.time()
        try:
            response = await self._session.request(method, url, allow_redirects=False, **kwargs)
        except TimeoutError:
            raise HqUnreachable(
                f"HQ {call} timed out after {self.settings.request_timeout:g} s ([hq]"
                " request_timeout)"
            ) from None
        except aiohttp.ClientError as exc:
            hint = _tls_hint(exc, self.settings, self._responded)
            # The next failure in a row gets the hint: a certificate that expired or was
            # revoked while the daemon ran fails every call from then on.
            self._responded = False
            raise HqUnreachable(
                f"HQ {call} failed: {_describe(exc, self.settings)}{hint}"
            ) from None

        self._responded = True
        try:
            self.clock.observe(response.headers.get("Date"), sent_at, time.time())
            if response.status in (401, 403):
                raise HqAuthFailed(call, response.status)
            if 300 <= response.status < 400:
                raise HqRedirected(call, response.status, response.headers.get("Location"))
            yield response
        finally:
            response.release()

    @staticmethod
    def _expect(response: aiohttp.ClientResponse, call: str, status: int) -> None:
        if response.status == status:
            return
        error = HqStatusError(call, response.status, str(response.url.with_query(None)))
        error.reachable = response.status not in UNAVAILABLE_STATUSES
        if response.status in RETRY_AFTER_STATUSES:
            error.retry_after = _retry_after_seconds(response.headers.get("Retry-After"))
        raise error

    async def _decode(
        self,
        response: aiohttp.ClientResponse,
        call: str,
        kind: type[T],
        max_bytes: int = MAX_JSON_BODY_BYTES,
    ) -> T:
        body = await _read_body(response, call, max_bytes, self.settings.request_timeout)
        if not body.strip():
            # msgspec calls an empty body "truncated", which suggests a cut connection.
            problem = "is empty" if not body else f"contains only whitespace ({len(body)} bytes)"
            raise HqResponseInvalid(
                f"HQ {call} response is invalid: the body {problem}"
                f" ({_describe_content_type(response)}); HQ must send a JSON object"
            )
        try:
            return msgspec.json.decode(body, type=kind)
        except msgspec.DecodeError as exc:
            raise HqResponseInvalid(
                f"HQ {call} response is invalid: {exc} ({self._describe_body(response, body)})"
            ) from None

    def _describe_body(self, response: aiohttp.ClientResponse, body: bytes) -> str:
        """Describe an invalid body by its Content-Type, and its start unless it is JSON.

        A JSON body may carry identity keys, which are secrets, so only a body that does not
        start like JSON (an HTML error page of a proxy, say) is quoted.
        """
        description = f"{_describe_content_type(response)}, {len(body)} bytes"
        text = body.lstrip()[:BODY_START_CHARS].decode("utf-8", errors="replace")
        if not text or text[0] in "{[":
            return description
        if self.settings.token:
            text = text.replace(self.settings.token, "<token>")
        return f"{description}, starting {text!r}"


def _check_page(page: _ChangesPage, limit: int) -> None:
    if len(page.changes) > limit:
        raise HqResponseInvalid(
            f"HQ changes page has {len(page.changes)} changes, more than the limit={limit}"
            " the daemon sent; HQ must return at most limit changes per page"
        )
    if not page.cursor:
        raise HqResponseInvalid(
            "HQ changes page has an empty cursor; HQ must return the cursor to continue from"
        )


def _describe_content_type(response: aiohttp.ClientResponse) -> str:
    """Name a response's Content-Type header, or its absence, for an error message."""
    content_type = response.headers.get("Content-Type")
    if content_type is None:
        return "no Content-Type header"
    return f"Content-Type {content_type[:80]!r}"


def _no_data_for(read_timeout: float | None) -> str:
    """Describe a read timeout of the session, which [hq] request_timeout sets."""
    if read_timeout is None:
        return "no data within [hq] request_timeout"
    return f"no data for {read_timeout:g} s ([hq] request_timeout)"


async def _read_body(
    response: aiohttp.ClientResponse, call: str, max_bytes: int, read_timeout: float
) -> bytes:
    """Read a whole response body; raise HqResponseInvalid past ``max_bytes`` (decoded).

    Raises HqBodyIncomplete when the body ends early or its framing does not decode, and
    HqUnreachable when no data comes for ``read_timeout`` seconds.
    """
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > max_bytes:
                raise HqResponseInvalid(
                    f"HQ {call} response is longer than {max_bytes} bytes; the daemon stopped"
                    " reading it"
                )
            parts.append(chunk)
    except TimeoutError:
        raise HqUnreachable(f"HQ {call} response timed out: {_no_data_for(read_timeout)}") from None
    except aiohttp.ClientError as exc:
        raise _body_incomplete(call, response, exc) from None
    return b"".join(parts)


def _body_incomplete(
    call: str, response: aiohttp.ClientResponse, error: aiohttp.ClientError, where: str = ""
) -> HqBodyIncomplete:
    """Describe a failed read of a response body by the URL path, without the query."""
    path = response.url.path
    if isinstance(error, aiohttp.ClientPayloadError):
        # aiohttp's text names its parser's error, such as "TransferEncodingError: 400,
        # message=...", which reads like an HTTP 400 from HQ.
        return HqBodyIncomplete(
            f"HQ {call} response body from {path} ended early or was malformed{where}"
        )
    # A connection error's own text ("Connection reset by peer") describes the failure.
    return HqBodyIncomplete(f"HQ {call} response body from {path} ended early{where}: {error}")


class KeyEncrypted(Exception):
    """The client key is encrypted, and the daemon has no passphrase to give OpenSSL."""


def load_client_certificate(context: ssl.SSLContext, cert_file: str, key_file: str | None) -> None:
    """Load HQ's client certificate and key into ``context``.

    Raises KeyEncrypted for a key that needs a passphrase.

    Without a password callback OpenSSL prompts for the passphrase on the terminal, which
    a service does not have.
    """

    def no_passphrase() -> bytes:
        raise KeyEncrypted(key_file or cert_file)

    context.load_cert_chain(cert_file, key_file, password=no_passphrase)


def _describe(error: aiohttp.ClientError, settings: SyncSettings) -> str:
    """aiohttp's text for a failed call, without its "ssl:default" where no TLS is used."""
    text = str(error)
    if not settings.base_url.startswith("https://"):
        text = text.replace(" ssl:default", "")
    return text


# Alerts in which a TLS server rejects the client's certificate, or the lack of one.
_CLIENT_CERT_ALERTS = ("certificate required", "bad certificate", "unknown ca", "handshake failure")


def _tls_hint(error: aiohttp.ClientError, settings: SyncSettings, responded: bool) -> str:
    """Return what to check in the configuration after a failed https call, or "".

    ``responded`` is whether the call before this one got an HTTP response.
    """
    if not settings.base_url.startswith("https://"):
        return ""
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        if settings.ca_file:
            return (
                "; HQ's certificate does not verify: check that [hq] ca_file holds the CA"
                " that issued it, and that it names the host of [hq] url"
            )
        return (
            "; HQ's certificate does not verify against the system's CAs: set [hq] ca_file"
            " to the CA that issued it"
        )
    text = str(error).lower()
    # A connection closed or reset without a response is, over TLS, usually a rejected
    # certificate. Right after a response, the handshake worked: the disconnect is more
    # likely HQ restarting, or a keep-alive connection closed under a POST, which aiohttp
    # does not retry.
    dropped = isinstance(error, aiohttp.ServerDisconnectedError) or (
        isinstance(error, aiohttp.ClientOSError) and error.errno == errno.ECONNRESET
    )
    alert = isinstance(error, aiohttp.ClientSSLError) and any(
        name in text for name in _CLIENT_CERT_ALERTS
    )
    if not alert and not (dropped and not responded):
        return ""
    if settings.client_cert_file:
        return (
            "; HQ closed the TLS connection without an answer. When every call fails like"
            " this, HQ does not accept the client certificate: check that [hq]"
            " client_cert_file is the certificate HQ issued for this store, that"
            " client_key_file is its key, and that it has not expired"
        )
    return (
        "; HQ closed the TLS connection without an answer. When every call fails like"
        " this, HQ requires a client certificate: set [hq] client_cert_file and"
        " client_key_file"
    )


def _retry_after_seconds(text: str | None) -> float | None:
    """Parse a Retry-After header (seconds or an HTTP date); None when absent or invalid."""
    if not text:
        return None
    text = text.strip()
    if text.isdigit():
        return float(text)
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def _to_change(change: _Put | _Remove) -> Change:
    if isinstance(change, _Put):
        return Change(op="PUT", record=change.record)
    return Change(op="REMOVE", credential_id=change.credentialId)


def _optional_int(text: str | None, header: str) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise HqResponseInvalid(f"header {header} is not an integer: {text[:40]!r}") from None
