"""ResolveScan: idempotency, lookup, policy, and the decision with its audit event."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog

from daemon.config import Config
from daemon.metrics import Metrics
from daemon.normalize import candidate_keys, strip_value
from daemon.policy import Reason, ScanContext, Verdict, decide
from daemon.schema import ResolveScanRequest, ResolveScanResponse, encode_response
from daemon.store import (
    LAST_PULL_META_KEY,
    Identity,
    KeyHasher,
    Rows,
    Store,
    StoredDecision,
    parse_meta_time,
)

log = structlog.get_logger(__name__)

_EVENT_ENCODER = msgspec.json.Encoder()


class IdempotencyConflict(Exception):
    """A scanEvent.id that was decided before for a different payload."""


@dataclass(frozen=True, slots=True)
class Evaluation:
    identity: Identity | None
    key_hash: bytes
    verdict: Verdict

    @property
    def fingerprint(self) -> str:
        return KeyHasher.fingerprint(self.key_hash)


class Resolver:
    """Decides scans from the store's cache under the configured policy."""

    def __init__(self, store: Store, config: Config, metrics: Metrics | None = None) -> None:
        self.store = store
        self.config = config
        self.metrics = metrics
        # scanEvent.id -> [lock, waiter count]: concurrent calls for one id queue on the lock,
        # so the first decides and the rest replay its stored response.
        self._inflight: dict[str, list[Any]] = {}
        # The running HQ sync (daemon.hq.HqSync), set by `serve` when [hq] is configured:
        # asked about cache misses, and the source of the clockUncertain flag.
        self.hq: Any = None

    def cache_stale(self, now: float) -> bool:
        """Return whether the stale-cache rule applies: HQ is configured but not pulled recently."""
        if self.config.hq is None:
            return False
        # A damaged last-pull time counts as never pulled: the cache is stale until a pull.
        last_pull = parse_meta_time(self.store.reader.meta(LAST_PULL_META_KEY), now)
        if last_pull is None:
            return True
        return now - last_pull > self.config.policy.max_cache_age

    def scan_context(
        self, store_id: str, location: str, channel: str, scanned_at: float, now: float
    ) -> ScanContext:
        """Describe a scan for the policy, with the stale-cache state at ``now``."""
        return ScanContext(
            store_id=store_id,
            location=location,
            channel=channel,
            scanned_at=scanned_at,
            now=now,
            cache_stale=self.cache_stale(now),
        )

    def evaluate(
        self,
        value: str,
        store_id: str,
        location: str,
        channel: str,
        scanned_at: float,
        now: float | None = None,
    ) -> Evaluation:
        """Look a scanned value up and apply the policy, recording nothing."""
        now = time.time() if now is None else now
        hasher = self.store.hasher
        policy = self.config.policy
        candidates = candidate_keys(value, channel, policy.value_encoding)
        context = self.scan_context(store_id, location, channel, scanned_at, now)

        if not candidates:
            key_hash = hasher.hash(strip_value(value))
            reason = Reason.INVALID_ENCODING if policy.value_encoding == "base64" else None
            if reason is not None:
                return Evaluation(None, key_hash, Verdict("REJECT", reason))
            return Evaluation(None, key_hash, decide(None, context, policy))

        first_hash = b""
        for candidate in candidates:
            key_hash = hasher.hash(candidate)
            first_hash = first_hash or key_hash
            identity = self.store.reader.identity_by_hash(key_hash)
            if identity is not None:
                return Evaluation(identity, key_hash, decide(identity, context, policy))
        return Evaluation(None, first_hash, decide(None, context, policy))

    async def resolve(self, request: ResolveScanRequest, started: float) -> tuple[bytes, bool]:
        """Return the response body for a request and whether it replays an earlier one.

        Raises IdempotencyConflict when the scanEvent.id was decided for another payload.
        """
        scan = request.scanEvent
        scan_id = scan.id.lower()
        request_hash = self.store.hasher.hash_parts(
            request.storeId, scan.location, scan.channel, scan.value
        )

        entry = self._inflight.get(scan_id)
        if entry is None:
            entry = [asyncio.Lock(), 0]
            self._inflight[scan_id] = entry
        entry[1] += 1
        try:
            async with entry[0]:
                stored = self.store.reader.decision(scan_id)
                if stored is not None:
                    return self._replay(stored, request_hash, request), True
                body = await self._decide_and_record(request, scan_id, request_hash, started)
                return body, False
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._inflight[scan_id]

    def _replay(
        self, stored: StoredDecision, request_hash: bytes, request: ResolveScanRequest
    ) -> bytes:
        if stored.request_hash != request_hash:
            log.warning(
                "scan.idempotency_conflict",
                request_id=request.requestId,
                scan_event_id=request.scanEvent.id,
                store_id=request.storeId,
            )
            raise IdempotencyConflict(request.scanEvent.id)
        if self.metrics is not None:
            self.metrics.replays.inc()
        log.info(
            "scan.replayed",
            request_id=request.requestId,
            scan_event_id=request.scanEvent.id,
            store_id=request.storeId,
        )
        return stored.response

    async def _decide_and_record(
        self, request: ResolveScanRequest, scan_id: str, request_hash: bytes, started: float
    ) -> bytes:
        scan = request.scanEvent
        now = time.time()
        evaluation = self.evaluate(
            scan.value,
            request.storeId,
            scan.location,
            scan.channel,
            scan.timestamp.timestamp(),
            now,
        )
        if self.hq is not None and evaluation.identity is None:
            evaluation = await self.hq.lookup_miss(
                self,
                evaluation,
                scan.value,
                request.storeId,
                scan.location,
                scan.channel,
                scan.timestamp.timestamp(),
                now,
            )
        identity = evaluation.identity
        verdict = evaluation.verdict
        response = ResolveScanResponse(
            id=identity.id if identity else scan.id,
            type=identity.type if identity else "SHOPPER",  # type: ignore[arg-type]
            action=verdict.action,  # type: ignore[arg-type]
        )
        body = encode_response(response)
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        clock_uncertain = self.hq is not None and self.hq.clock_uncertain

        event = audit_event(
            source="gateway",
            store_id=request.storeId,
            request_id=request.requestId,
            scan_event_id=scan.id,
            scanned_at=scan.timestamp,
            location=scan.location,
            channel=scan.channel,
            evaluation=evaluation,
            latency_ms=latency_ms,
            now=now,
            extra={"clockUncertain": True} if clock_uncertain else None,
        )
        await self.store.writer.submit(
            decision_rows(scan_id, request_hash, body, verdict, event, now)
        )
        if self.metrics is not None:
            self.metrics.count_decision(verdict.action, verdict.reason.value, response.type)
            self.metrics.latency.observe(time.perf_counter() - started)
        log.info(
            "scan.decided",
            request_id=request.requestId,
            scan_event_id=scan.id,
            store_id=request.storeId,
            location=scan.location,
            channel=scan.channel,
            key_fingerprint=evaluation.fingerprint,
            identity_id=response.id if identity else None,
            type=response.type,
            action=verdict.action,
            reason=verdict.reason.value,
            overridden=[r.value for r in verdict.overridden] or None,
            latency_ms=latency_ms,
        )
        return body


def new_event_id() -> str:
    """Return a UUID whose first 48 bits are the time in ms (the RFC 9562 version 7 layout).

    Ids made later sort later, so the outbox's event_id index grows at its end instead of
    gaining a page in a random place for every decision; 74 random bits keep ids unique.
    """
    random_bits = int.from_bytes(os.urandom(10), "big")
    value = (
        (time.time_ns() // 1_000_000) << 80
        | 0x7 << 76
        | (random_bits >> 62 & 0xFFF) << 64
        | 0b10 << 62
        | random_bits & _LOW_62_BITS
    )
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


_LOW_62_BITS = (1 << 62) - 1


def audit_event(
    *,
    source: str,
    store_id: str,
    request_id: str | None,
    scan_event_id: str | None,
    scanned_at: datetime,
    location: str,
    channel: str,
    evaluation: Evaluation,
    latency_ms: float,
    now: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the audit event HQ receives for a decision; it never contains the scanned value."""
    identity = evaluation.identity
    verdict = evaluation.verdict
    event: dict[str, Any] = {
        "eventId": new_event_id(),
        "time": datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z"),
        "source": source,
        "storeId": store_id,
        "requestId": request_id,
        "scanEventId": scan_event_id,
        "scanTime": scanned_at.isoformat(),
        "location": location,
        "channel": channel,
        "keyFingerprint": evaluation.fingerprint,
        "credentialId": identity.credential_id if identity else None,
        "identityId": identity.id if identity else None,
        "type": identity.type if identity else None,
        "action": verdict.action,
        "reason": verdict.reason.value,
        "overriddenReasons": [r.value for r in verdict.overridden],
        "latencyMs": latency_ms,
        "clockUncertain": False,
    }
    if extra:
        event.update(extra)
    return event


_INSERT_DECISION = (
    "INSERT INTO decisions (scan_event_id, request_hash, response, action, reason, decided_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_INSERT_EVENT = "INSERT INTO outbox (event_id, created_at, body) VALUES (?, ?, ?)"


def decision_rows(
    scan_id: str,
    request_hash: bytes,
    body: bytes,
    verdict: Verdict,
    event: dict[str, Any],
    now: float,
) -> Rows:
    """The decision and its outbox event as one writer job, so both commit together."""
    return Rows(
        (
            (
                _INSERT_DECISION,
                (scan_id, request_hash, body, verdict.action, verdict.reason.value, now),
            ),
            (_INSERT_EVENT, (event["eventId"], now, _EVENT_ENCODER.encode(event))),
        )
    )


def prune_decisions(connection: sqlite3.Connection, older_than: float) -> int:
    """Delete idempotency records decided before ``older_than``; return how many."""
    cursor = connection.execute("DELETE FROM decisions WHERE decided_at < ?", (older_than,))
    return cursor.rowcount
