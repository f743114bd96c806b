"""A fake HQ for sync tests: the whole HQ sync contract on a loopback aiohttp server.

It runs in a background thread with its own event loop. Tests steer it through plain
attributes and methods (outage, slowness, error statuses, cut or invalid snapshot streams,
responses cut mid-body, cursor expiry, partial and duplicate acknowledgements) and read what
it received.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web
from aiohttp.web import ContentCoding

from daemon import cachefile

if TYPE_CHECKING:
    from tests.conftest import Daemon

TOKEN = "fake-hq-token-3c9d"
SnapshotMode = Literal["ok", "cut", "invalid"]
AckMode = Literal["all", "partial", "duplicate", "none"]
Framing = Literal["chunked", "content-length"]


@dataclass(frozen=True)
class RawAnswer:
    """A fixed answer that one call gets in place of its own (a redirect, an HTML page)."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Control:
    """What a test can change while the fake HQ runs."""

    delay: float = 0.0
    """Seconds every answer waits before it is sent."""
    lookup_delay: float = 0.0
    fail_status: int | None = None
    """Status every call returns instead of its answer, while set."""
    snapshot_mode: SnapshotMode = "ok"
    snapshot_cut_after: int = 5
    """Lines sent before a "cut" stream is aborted or an "invalid" one gets a broken line."""
    snapshot_line_delay: float = 0.0
    """Seconds to wait after each chunk of 500 snapshot lines."""
    ack_mode: AckMode = "all"
    ack_limit: int = 2
    """Events acknowledged per request in "partial" mode."""
    clock_offset: float = 0.0
    """Seconds added to the Date header."""
    digest_salt: str = ""
    """Text mixed into the digest, to make it disagree with every client."""
    lookup_answer: dict[str, Any] | None = None
    """Record that every lookup returns, whatever its key, as a faulty HQ would."""
    stuck_cursor: bool = False
    """Changes pages return the cursor they were asked for, with hasMore true: an HQ bug."""
    empty_cursor: bool = False
    """Changes pages return the cursor "": an HQ bug."""
    ignore_limit: bool = False
    """Changes pages hold every change after the cursor, whatever the request's limit."""
    snapshot_cursor_expired: bool = False
    """The snapshot's Identity-Cursor is one that the changes feed answers with 410."""
    expired_cursors: set[str] = field(default_factory=set)
    """Cursors that the changes feed rejects with 410 Gone, whatever their epoch."""
    cut_calls: set[str] = field(default_factory=set)
    """Calls ("changes", "digest", ...) whose response stops halfway through its body."""
    cut_framing: Framing = "chunked"
    """How a cut response frames its body: chunked, or with the whole body's Content-Length."""
    snapshot_count: int | None = None
    """Identity-Count header of the snapshot in place of the number of records, when set."""
    raw_answers: dict[str, RawAnswer] = field(default_factory=dict)
    """Answers by call name ("changes", "snapshot", "digest", "lookup", "events")."""
    stalled_calls: set[str] = field(default_factory=set)
    """Calls whose response sends half of its body, waits ``stall_seconds``, then the rest."""
    stall_seconds: float = 3.0


@dataclass
class Received:
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Stored events by eventId, in the order first received."""
    event_posts: int = 0
    repeats: int = 0
    """Events received again after they were stored (HQ drops them)."""
    requests: Counter = field(default_factory=Counter)
    request_times: dict[str, list[float]] = field(default_factory=dict)
    """``time.monotonic()`` of each request, by call name."""
    snapshot_lines_sent: int = 0
    lookups: list[str] = field(default_factory=list)
    authorization: set[str] = field(default_factory=set)


class FakeHq:
    """HQ for one store: a change log, its cursors, a snapshot, digests and an event sink.

    Cursors are "<epoch>.<position>": the position counts changes of the log. Expiring
    cursors raises the epoch, so every cursor handed out before gets 410 Gone.
    """

    def __init__(
        self, store_id: str = "STORE-001", ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.store_id = store_id
        self.ssl_context = ssl_context
        """Served over https with this context when set, else over http."""
        self.control = Control()
        self.received = Received()
        self.lock = threading.Lock()
        self.log: list[tuple[str, Any]] = []
        self.records: dict[str, dict[str, Any]] = {}
        self.epoch = 1
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-hq", daemon=True)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.is_down = False

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = "http" if self.ssl_context is None else "https"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> FakeHq:
        self._thread.start()
        self._call(self._start())
        return self

    def close(self) -> None:
        if self._runner is not None:
            self._call(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def down(self) -> None:
        """Stop listening and drop open connections: calls fail as unreachable."""
        self.is_down = True
        if self._site is not None:
            self._call(self._site.stop())
            self._site = None

    def up(self) -> None:
        self.is_down = False
        self._call(self._listen())

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        prefix = f"/v1/stores/{self.store_id}"
        app.router.add_get(prefix + "/identities/changes", self._changes)
        app.router.add_get(prefix + "/identities/snapshot", self._snapshot)
        app.router.add_get(prefix + "/identities/digest", self._digest)
        app.router.add_post(prefix + "/identities/lookup", self._lookup)
        app.router.add_post(prefix + "/events", self._events)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(
            self._runner,
            "127.0.0.1",
            self.port,
            reuse_address=True,
            ssl_context=self.ssl_context,
        )
        await self._site.start()
        if not self.port:
            self.port = self._site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    # -- data --------------------------------------------------------------------------

    def cursor(self) -> str:
        with self.lock:
            return f"{self.epoch}.{len(self.log)}"

    def put(self, *records: dict[str, Any]) -> str:
        """Append PUT changes; return the new cursor."""
        with self.lock:
            for record in records:
                self.log.append(("PUT", dict(record)))
                self.records[record["credentialId"]] = dict(record)
        return self.cursor()

    def remove(self, *credential_ids: str) -> str:
        with self.lock:
            for credential_id in credential_ids:
                self.log.append(("REMOVE", credential_id))
                self.records.pop(credential_id, None)
        return self.cursor()

    def change_silently(self, record: dict[str, Any]) -> None:
        """Change a record without a feed entry, as an HQ bug would: only a digest shows it."""
        with self.lock:
            self.records[record["credentialId"]] = dict(record)

    def expire_cursors(self) -> None:
        """Make every cursor handed out so far answer 410 Gone."""
        with self.lock:
            self.epoch += 1

    def state_at(self, cursor: str) -> dict[str, dict[str, Any]]:
        """Records as they were at ``cursor`` (of the current epoch, or a snapshot's)."""
        position = int(cursor.split(".")[1])
        state: dict[str, dict[str, Any]] = {}
        with self.lock:
            for op, payload in self.log[:position]:
                if op == "PUT":
                    state[payload["credentialId"]] = payload
                else:
                    state.pop(payload, None)
        return state

    @staticmethod
    def digest_of(records: dict[str, dict[str, Any]]) -> str:
        sha = hashlib.sha256()
        for credential_id in sorted(records, key=lambda c: c.encode()):
            sha.update(f"{credential_id}:{records[credential_id].get('version', 0)}\n".encode())
        return sha.hexdigest()

    # -- handlers ----------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        name = request.path.rsplit("/", 1)[-1]
        self.received.requests[name] += 1
        self.received.request_times.setdefault(name, []).append(time.monotonic())
        self.received.authorization.add(request.headers.get("Authorization", ""))
        if self.is_down:
            # A connection opened before the outage: close it without an answer.
            assert request.transport is not None
            request.transport.close()
            raise web.HTTPServiceUnavailable()
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._json({"title": "unauthorized"}, status=401)
        if self.control.delay:
            await asyncio.sleep(self.control.delay)
        if self.control.fail_status is not None:
            return self._json({"title": "failing on purpose"}, status=self.control.fail_status)
        raw = self.control.raw_answers.get(name)
        if raw is not None:
            headers = {"Date": self._date(), **raw.headers}
            return web.Response(status=raw.status, body=raw.body, headers=headers)
        if name in self.control.cut_calls:
            return await self._cut(request, await handler(request))
        if name in self.control.stalled_calls:
            return await self._stall(request, await handler(request))
        return await handler(request)

    async def _cut(self, request: web.Request, answer: web.Response) -> web.StreamResponse:
        """Send the status, the headers and half of ``answer``'s body, then close."""
        body = bytes(answer.body or b"")
        response = web.StreamResponse(
            status=answer.status,
            headers={"Content-Type": answer.content_type, "Date": self._date()},
        )
        if self.control.cut_framing == "content-length":
            response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        # close, not abort: the half that was written reaches the client first.
        assert request.transport is not None
        request.transport.close()
        return response

    async def _stall(self, request: web.Request, answer: web.Response) -> web.StreamResponse:
        """Send the status, the headers and half of ``answer``'s body, pause, then the rest."""
        body = bytes(answer.body or b"")
        response = web.StreamResponse(
            status=answer.status,
            headers={"Content-Type": answer.content_type, "Date": self._date()},
        )
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        await asyncio.sleep(self.control.stall_seconds)
        await response.write(body[len(body) // 2 :])
        await response.write_eof()
        return response

    def _date(self) -> str:
        return formatdate(time.time() + self.control.clock_offset, usegmt=True)

    def _json(self, data: Any, status: int = 200) -> web.Response:
        response = web.json_response(data, status=status, headers={"Date": self._date()})
        response.enable_compression(ContentCoding.gzip)
        return response

    async def _changes(self, request: web.Request) -> web.Response:
        limit = int(request.query.get("limit", "1000"))
        cursor = request.query.get("cursor")
        with self.lock:
            if cursor is None:
                position = 0
            else:
                epoch, _, text = cursor.partition(".")
                if int(epoch) != self.epoch or cursor in self.control.expired_cursors:
                    return self._json({"title": "cursor expired"}, status=410)
                position = int(text)
            size = len(self.log) if self.control.ignore_limit else limit
            window = self.log[position : position + size]
            end = position + len(window)
            stuck = self.control.stuck_cursor and cursor is not None
            next_cursor = cursor if stuck else f"{self.epoch}.{end}"
            answer = {
                "cursor": "" if self.control.empty_cursor else next_cursor,
                "hasMore": stuck or end < len(self.log),
                "changes": [
                    {"op": "PUT", "record": payload}
                    if op == "PUT"
                    else {"op": "REMOVE", "credentialId": payload}
                    for op, payload in window
                ],
            }
        return self._json(answer)

    async def _snapshot(self, request: web.Request) -> web.StreamResponse:
        with self.lock:
            records = [self.records[c] for c in sorted(self.records)]
            epoch = self.epoch - 1 if self.control.snapshot_cursor_expired else self.epoch
            cursor = f"{epoch}.{len(self.log)}"
        control = self.control
        count = len(records) if control.snapshot_count is None else control.snapshot_count
        response = web.StreamResponse(
            headers={
                "Content-Type": "application/x-ndjson",
                "Identity-Cursor": cursor,
                "Identity-Count": str(count),
                "Date": self._date(),
            }
        )
        response.enable_compression(ContentCoding.gzip)
        await response.prepare(request)

        chunk: list[bytes] = []
        for number, record in enumerate(records, start=1):
            if control.snapshot_mode != "ok" and number > control.snapshot_cut_after:
                if control.snapshot_mode == "invalid":
                    chunk.append(b'{"credentialId": "broken", \n')
                    continue
                await response.write(b"".join(chunk) + b'{"credentialId": "c-')
                assert request.transport is not None
                request.transport.abort()
                return response
            chunk.append(json.dumps(record).encode() + b"\n")
            self.received.snapshot_lines_sent += 1
            if len(chunk) >= 500:
                await response.write(b"".join(chunk))
                chunk = []
                if control.snapshot_line_delay:
                    await asyncio.sleep(control.snapshot_line_delay)
        await response.write(b"".join(chunk))
        await response.write_eof()
        return response

    async def _digest(self, request: web.Request) -> web.Response:
        with self.lock:
            records = dict(self.records)
            cursor = f"{self.epoch}.{len(self.log)}"
        digest = self.digest_of(records)
        if self.control.digest_salt:
            digest = hashlib.sha256((digest + self.control.digest_salt).encode()).hexdigest()
        return self._json({"cursor": cursor, "count": len(records), "digest": digest})

    async def _lookup(self, request: web.Request) -> web.Response:
        body = await request.json()
        key = body["key"]
        self.received.lookups.append(key)
        if self.control.lookup_delay:
            await asyncio.sleep(self.control.lookup_delay)
        with self.lock:
            found = self.control.lookup_answer or next(
                (r for r in self.records.values() if r["key"] == key), None
            )
        if found is None:
            return self._json({"title": "not found"}, status=404)
        return self._json({"record": found})

    async def _events(self, request: web.Request) -> web.Response:
        body = await request.json()
        events = body["events"]
        self.received.event_posts += 1
        mode = self.control.ack_mode
        if mode == "none":
            return self._json({"accepted": []})
        taken = events[: self.control.ack_limit] if mode == "partial" else events
        for event in taken:
            if event["eventId"] in self.received.events:
                self.received.repeats += 1
            else:
                self.received.events[event["eventId"]] = event
        accepted = [event["eventId"] for event in taken]
        if mode == "duplicate":
            accepted = accepted + accepted[:3] + ["00000000-0000-4000-8000-000000000000"]
        return self._json({"accepted": accepted})


# -- helpers for the sync tests ------------------------------------------------------------

WAIT_TIMEOUT = 30.0


def hq_config(hq: FakeHq, directory: Path, extra: str = "", policy: str = "") -> str:
    """Return the [hq] table (and an optional [policy] table) for a test daemon's config.

    Intervals are short so a test sees several pulls and uploads per second.
    """
    token_path = directory / "hq-token"
    directory.mkdir(parents=True, exist_ok=True)
    token_path.write_text(TOKEN + "\n", encoding="utf-8")
    policy_table = f"\n[policy]\n{policy}\n" if policy else ""
    return f"""{policy_table}
[hq]
url = "{hq.url}"
token_file = "{token_path}"
pull_interval = "200ms"
lookup_timeout = "300ms"
request_timeout = "2s"
backoff_initial = "100ms"
backoff_max = "400ms"
offline_after = 2
upload_interval = "100ms"
upload_max_delay = "100ms"
outbox_trim_interval = "200ms"
{extra}
"""


def wait_until(predicate: Callable[[], Any], timeout: float = WAIT_TIMEOUT, what: str = "") -> Any:
    """Poll ``predicate`` until it returns a true value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(0.05)


def query(database: Path, sql: str, parameters: tuple = ()) -> list[tuple]:
    """Run a read query on its own connection, as another process would.

    The cache file the database names is attached, so the query can read identities too.
    """
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
    try:
        name = cachefile.pointer(connection)
        if name is not None:
            cache = database.with_name(name)
            connection.execute(f"ATTACH DATABASE 'file:{cache}?mode=ro' AS {cachefile.ALIAS}")
        return connection.execute(sql, parameters).fetchall()
    finally:
        connection.close()


def meta(database: Path, key: str) -> str | None:
    table = cachefile.meta_table(key)
    rows = query(database, f"SELECT value FROM {table} WHERE key = ?", (key,))
    return rows[0][0] if rows else None


def set_meta(database: Path, values: dict[str, str]) -> None:
    """Write meta values into the database or its cache file, wherever each key lives."""
    connection = sqlite3.connect(database)
    try:
        cache = database.with_name(cachefile.pointer(connection) or "")
    finally:
        connection.close()
    for key, value in values.items():
        path = cache if cachefile.meta_table(key) == "cache_meta" else database
        target = sqlite3.connect(path)
        try:
            target.execute(
                f"INSERT INTO {cachefile.meta_table(key)} (key, value) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
            target.commit()
        finally:
            target.close()


def log_events(daemon: Daemon, event: str) -> list[dict]:
    return [line for line in daemon.log_lines() if line["event"] == event]


def states_during(daemon: Daemon, seconds: float) -> set[str | None]:
    """Sample the HQ state that the daemon stores for `status`, every 50 ms."""
    states = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        states.add(meta(daemon.database, "hq_state"))
        time.sleep(0.05)
    return states


def local_versions(database: Path) -> dict[str, int]:
    return dict(query(database, "SELECT credential_id, version FROM identities"))


def outbox_ids(database: Path) -> list[str]:
    return [row[0] for row in query(database, "SELECT event_id FROM outbox ORDER BY seq")]


def versions_of(records: dict[str, dict[str, Any]]) -> dict[str, int]:
    return {credential_id: record.get("version", 0) for credential_id, record in records.items()}


def make_records(count: int, prefix: str = "bulk", version: int = 1) -> list[dict[str, Any]]:
    return [
        {
            "credentialId": f"{prefix}-{number:06d}",
            "key": f"KEY-{prefix.upper()}-{number:06d}-9f",
            "id": f"{prefix}-shopper-{number}",
            "type": "SHOPPER",
            "status": "ACTIVE",
            "stores": ["STORE-001"],
            "version": version,
        }
        for number in range(count)
    ]
