"""Local scans: the box's own scanners, decided through the gateway's policy at stations.

A scan from a device goes: blank-value check, stale-capture check, debounce,
lookup and policy (location MANUAL_IN_STORE, the device's channel), associate
session update, feedback to the device, audit event in the outbox, and an
event on the local stream. Device health goes to ``Runtime.devices`` and to
the stream, and reads that a driver dropped go to the metrics.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import os
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog
from aiohttp import web

from daemon.config import Config
from daemon.devices import DeviceConfig, DeviceManager, device_configs
from daemon.events import EventHub, client_allowed, encode_event, stream
from daemon.normalize import strip_value
from daemon.resolver import Evaluation, audit_event
from daemon.runtime import DeviceState, Runtime
from daemon.stations import Debouncer, SessionChange, SessionEvent, Stations
from daemon.store import DEVICE_HEALTH_META_KEY, KeyHasher, Rows
from drivers.base import Driver, Dropped, Health, LogThrottle, Scan

log = structlog.get_logger(__name__)

LOCATION = "MANUAL_IN_STORE"
UNATTENDED = "unattended"
EVENTS_PATH = "/v1/local/events"
DEVICES_PATH = "/v1/local/devices"

# Seconds between two warnings about stale captures from the same device.
STALE_LOG_INTERVAL = 60.0
# Seconds between two warnings about blank scans from the same device.
BLANK_LOG_INTERVAL = 60.0

_ENCODER = msgspec.json.Encoder()


def local_decision_rows(event: dict[str, Any], now: float) -> Rows:
    """Return the writer job that queues a local decision's audit event for HQ.

    Local scans have no scanEvent.id to replay, so unlike gateway decisions they get no
    idempotency record. As a Rows job, like a gateway decision, it commits in the same
    transaction as other decisions and does not wait for an import's lock on the cache file.
    """
    return Rows(
        (
            (
                "INSERT INTO outbox (event_id, created_at, body) VALUES (?, ?, ?)",
                (event["eventId"], now, _ENCODER.encode(event)),
            ),
        )
    )


def store_device_health(connection: sqlite3.Connection, value: str | None) -> None:
    """Write the device health record, or delete it when ``value`` is None."""
    if value is None:
        connection.execute("DELETE FROM meta WHERE key = ?", (DEVICE_HEALTH_META_KEY,))
    else:
        connection.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            (DEVICE_HEALTH_META_KEY, value),
        )


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


# Feedback writes of one device that may wait behind a write still in progress. A burst of
# scans gets a beep each, while a scanner whose flow control stops the writes does not
# collect a queue.
MAX_PENDING_FEEDBACK = 4


class LocalScanning:
    """The station logic, the device drivers and the event stream of one running daemon."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.hub = EventHub()
        self.stations = Stations()
        self.debouncer = Debouncer()
        self.manager = DeviceManager(self.handle_scan, self.handle_health, self.handle_drop)
        self._devices: dict[str, DeviceConfig] = {}
        self._stale_log = LogThrottle(STALE_LOG_INTERVAL)
        self._blank_log = LogThrottle(BLANK_LOG_INTERVAL)
        self._sessions_changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._health_writer: asyncio.Task[None] | None = None
        self._health_changed = False
        # Feedback writes not finished yet, and per device their count and the lock that
        # keeps them in scan order.
        self._feedback_tasks: set[asyncio.Task[None]] = set()
        self._feedback_pending: collections.Counter[str] = collections.Counter()
        self._feedback_locks: dict[str, asyncio.Lock] = {}

    @property
    def config(self) -> Config:
        return self.runtime.config

    async def start(self) -> None:
        """Start the configured drivers and the session timer; apply reloads from now on."""
        self._tasks.append(asyncio.create_task(self._expire_sessions(), name="station-sessions"))
        self.runtime.reload_hooks.append(self._on_reload)
        await self._apply(self.config)

    async def stop(self) -> None:
        """Stop the drivers and end every event stream."""
        with contextlib.suppress(ValueError):
            self.runtime.reload_hooks.remove(self._on_reload)
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.manager.stop()
        feedback, self._feedback_tasks = list(self._feedback_tasks), set()
        for task in feedback:
            task.cancel()
        await asyncio.gather(*feedback, return_exceptions=True)
        self.hub.close()
        writer, self._health_writer = self._health_writer, None
        if writer is not None:
            await writer
        # A record left behind would show a stopped daemon's devices as available.
        await self._write_health_record(None)

    def _on_reload(self, config: Config) -> None:
        # Called from the SIGHUP handler on the loop; the drivers restart in a task.
        task = asyncio.get_running_loop().create_task(self._apply(config), name="devices-reload")
        self._tasks.append(task)
        task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("devices.reload_failed", error=repr(task.exception()))

    async def _apply(self, config: Config) -> None:
        devices = device_configs(config.devices)
        self._devices = {device.name: device for device in devices}
        for name in list(self.runtime.devices):
            if name not in self._devices:
                del self.runtime.devices[name]
                self._save_health()
        await self.manager.apply(devices)

    # --- Health --------------------------------------------------------------------------

    def handle_health(self, device: DeviceConfig, health: Health) -> None:
        """Record a device's health change and publish it; the driver has logged it."""
        previous = self.runtime.devices.get(device.name)
        if (
            previous is not None
            and previous.available == health.available
            and previous.error == health.error
        ):
            return
        state = DeviceState(available=health.available, error=health.error)
        if previous is not None and previous.available == health.available:
            state.since = previous.since
        self.runtime.devices[device.name] = state
        self.hub.publish("device.health", self._health_data(device, state))
        self._save_health()

    def _save_health(self) -> None:
        """Write the device health to the database soon, for `status` and `devices`."""
        self._health_changed = True
        if self._health_writer is None or self._health_writer.done():
            self._health_writer = asyncio.get_running_loop().create_task(
                self._write_health(), name="device-health"
            )

    async def _write_health(self) -> None:
        # Changes that arrive while one record is written go into the next one.
        while self._health_changed:
            self._health_changed = False
            record = {
                "pid": os.getpid(),
                "recordedAt": time.time(),
                "devices": {
                    name: {"available": state.available, "error": state.error, "since": state.since}
                    for name, state in self.runtime.devices.items()
                },
            }
            if not await self._write_health_record(json.dumps(record)):
                return

    async def _write_health_record(self, value: str | None) -> bool:
        try:
            await self.runtime.store.writer.submit(
                functools.partial(store_device_health, value=value)
            )
        except Exception as exc:
            # The next health change writes the whole record again.
            log.warning("devices.health_not_stored", error=str(exc))
            return False
        return True

    def _health_data(self, device: DeviceConfig, state: DeviceState) -> dict[str, Any]:
        return {
            "device": device.name,
            "kind": device.kind,
            "station": device.station,
            "available": state.available,
            "error": state.error,
            "since": _iso(state.since),
        }

    # --- Scans ---------------------------------------------------------------------------

    def handle_drop(self, device: DeviceConfig, dropped: Dropped) -> None:
        """Count a read that the driver dropped and has logged."""
        self._count_drop(device, dropped.reason)

    def _count_drop(self, device: DeviceConfig, reason: str) -> None:
        metrics = self.runtime.resolver.metrics
        if metrics is not None:
            metrics.count_dropped_read(device.name, reason)

    async def handle_scan(self, device: DeviceConfig, driver: Driver, scan: Scan) -> None:
        """Decide one scan from a device, record it, give feedback and publish it."""
        started = time.perf_counter()
        config = self.config
        local = config.local
        now = time.time()
        monotonic = time.monotonic()
        key = strip_value(scan.value)
        if not key:
            # A frame of only spaces or NUL bytes would otherwise be rejected as the empty
            # key (UNKNOWN_KEY), with bad-read feedback and an audit event.
            self._drop_blank(device, scan, monotonic)
            return
        key_hash = self.runtime.store.hasher.hash(key)
        fingerprint = KeyHasher.fingerprint(key_hash)

        age = now - scan.captured_at.timestamp()
        if age > config.policy.max_scan_age:
            self._log_stale(device, fingerprint, age, monotonic)
            return
        if self.debouncer.is_repeat(device.name, key_hash, now=monotonic, window=local.debounce):
            log.debug("scan.debounced", device=device.name, key_fingerprint=fingerprint)
            return

        self._publish_sessions(self.stations.expire(monotonic))
        evaluation = await self._evaluate(scan, now)
        identity = evaluation.identity
        accepted = evaluation.verdict.action == "ACCEPT"

        session_events: list[SessionEvent] = []
        if accepted and identity is not None and identity.type == "ASSOCIATE":
            session_events = self.stations.badge(
                device.station,
                identity.id,
                identity.credential_id,
                now=monotonic,
                wall_time=now,
                timeout=local.session_timeout,
            )
            associate = identity.id
        else:
            session = self.stations.touch(
                device.station, now=monotonic, timeout=local.session_timeout
            )
            associate = session.associate if session is not None else UNATTENDED
        session_change = session_events[-1].change.value if session_events else None

        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        event = self._audit_event(
            device, scan, evaluation, associate, session_change, now, latency_ms
        )
        # The decision is committed before the scanner gives its feedback, so a crash right
        # after the beep cannot lose the audit event.
        await self._record(device, event, now)
        self._start_feedback(device, driver, accepted)
        self._count(evaluation)
        log.info(
            "scan.decided",
            source="device",
            device=device.name,
            station=device.station,
            location=LOCATION,
            channel=scan.channel,
            key_fingerprint=fingerprint,
            identity_id=identity.id if identity else None,
            type=identity.type if identity else None,
            action=evaluation.verdict.action,
            reason=evaluation.verdict.reason.value,
            associate=associate,
            session=session_change,
            latency_ms=latency_ms,
        )
        self.hub.publish("scan.decided", self._decision_data(event))
        self._publish_sessions(session_events)

    def _drop_blank(self, device: DeviceConfig, scan: Scan, monotonic: float) -> None:
        fields = {
            "device": device.name,
            "station": device.station,
            "reason": "blank",
            "length": len(scan.value),
            "detail": "only whitespace and control characters; not decided",
        }
        if self._blank_log.allow(device.name, monotonic):
            log.warning("scan.dropped", **fields)
        else:
            log.debug("scan.dropped", **fields)
        self._count_drop(device, "blank")

    def _log_stale(
        self, device: DeviceConfig, fingerprint: str, age: float, monotonic: float
    ) -> None:
        fields = {
            "device": device.name,
            "station": device.station,
            "key_fingerprint": fingerprint,
            "age_seconds": round(age, 1),
            "max_scan_age": self.config.policy.max_scan_age,
            "detail": "captured too long ago, as by a reader that queued reads while"
            " disconnected; not decided",
        }
        if self._stale_log.allow(device.name, monotonic):
            log.warning("scan.stale", **fields)
        else:
            log.debug("scan.stale", **fields)

    def _store_id(self) -> str:
        return self.config.local.store_id or self.config.stores.ids[0]

    async def _evaluate(self, scan: Scan, now: float) -> Evaluation:
        resolver = self.runtime.resolver
        store_id = self._store_id()
        scanned_at = scan.captured_at.timestamp()
        evaluation = resolver.evaluate(
            scan.value, store_id, LOCATION, scan.channel, scanned_at, now
        )
        if resolver.hq is not None and evaluation.identity is None:
            evaluation = await resolver.hq.lookup_miss(
                resolver, evaluation, scan.value, store_id, LOCATION, scan.channel, scanned_at, now
            )
        return evaluation

    def _start_feedback(self, device: DeviceConfig, driver: Driver, accepted: bool) -> None:
        """Send the feedback in a task of its own, so the driver reads the next scan at once.

        A scanner that does not take its feedback bytes (flow control holding them back) would
        otherwise delay every scan by the driver's write timeout. Writes of one device run in
        scan order. Past MAX_PENDING_FEEDBACK unfinished writes the feedback is skipped,
        because a beep that late would be taken for a later scan's.
        """
        if self._feedback_pending[device.name] >= MAX_PENDING_FEEDBACK:
            log.debug("device.feedback_skipped", device=device.name, reason="writes pending")
            return
        self._feedback_pending[device.name] += 1
        task = asyncio.get_running_loop().create_task(
            self._feedback_in_order(device, driver, accepted), name=f"feedback-{device.name}"
        )
        self._feedback_tasks.add(task)
        task.add_done_callback(self._feedback_tasks.discard)

    async def _feedback_in_order(
        self, device: DeviceConfig, driver: Driver, accepted: bool
    ) -> None:
        lock = self._feedback_locks.setdefault(device.name, asyncio.Lock())
        try:
            async with lock:
                await self._feedback(device, driver, accepted)
        finally:
            self._feedback_pending[device.name] -= 1

    async def _feedback(self, device: DeviceConfig, driver: Driver, accepted: bool) -> None:
        try:
            await driver.feedback(accepted)
        except Exception as error:
            # Drivers log their own write errors; this catches the unexpected ones.
            log.warning("device.feedback_failed", device=device.name, error=repr(error))

    def _audit_event(
        self,
        device: DeviceConfig,
        scan: Scan,
        evaluation: Evaluation,
        associate: str,
        session_change: str | None,
        now: float,
        latency_ms: float,
    ) -> dict[str, Any]:
        hq = self.runtime.resolver.hq
        extra: dict[str, Any] = {
            "device": device.name,
            "station": device.station,
            "associate": associate,
            "session": session_change,
        }
        if hq is not None and hq.clock_uncertain:
            extra["clockUncertain"] = True
        return audit_event(
            source="device",
            store_id=self._store_id(),
            request_id=None,
            scan_event_id=None,
            scanned_at=scan.captured_at,
            location=LOCATION,
            channel=scan.channel,
            evaluation=evaluation,
            latency_ms=latency_ms,
            now=now,
            extra=extra,
        )

    async def _record(self, device: DeviceConfig, event: dict[str, Any], now: float) -> None:
        try:
            await self.runtime.store.writer.submit(local_decision_rows(event, now))
        except Exception as error:
            # The device already had its feedback. The decision still goes to the log and the
            # stream, so an operator can see which event the outbox is missing.
            log.error(
                "scan.record_failed",
                device=device.name,
                event_id=event["eventId"],
                error=str(error),
            )

    def _count(self, evaluation: Evaluation) -> None:
        metrics = self.runtime.resolver.metrics
        if metrics is None:
            return
        identity = evaluation.identity
        verdict = evaluation.verdict
        # An unknown key has no type, as in scan.decided and the event stream. The gateway
        # counts it as SHOPPER because that is the type its response carries.
        kind = identity.type if identity else None
        metrics.count_decision(verdict.action, verdict.reason.value, kind, "device")

    @staticmethod
    def _decision_data(event: dict[str, Any]) -> dict[str, Any]:
        return {
            "eventId": event["eventId"],
            "time": event["time"],
            "device": event["device"],
            "station": event["station"],
            "channel": event["channel"],
            "location": event["location"],
            "action": event["action"],
            "type": event["type"],
            "id": event["identityId"],
            "reason": event["reason"],
            "associate": event["associate"],
            "session": event["session"],
            "keyFingerprint": event["keyFingerprint"],
        }

    # --- Sessions ------------------------------------------------------------------------

    def _publish_sessions(self, events: list[SessionEvent]) -> None:
        for event in events:
            session = event.session
            fields = {"station": session.station, "associate": session.associate}
            if event.change is SessionChange.OPENED:
                log.info("station.session_opened", **fields)
            else:
                log.info(
                    "station.session_ended",
                    change=event.change.value,
                    minutes=round((time.time() - session.opened_at) / 60, 1),
                    **fields,
                )
            self.hub.publish(
                "station.session",
                {**fields, "change": event.change.value, "openedAt": _iso(session.opened_at)},
            )
        if events:
            self._sessions_changed.set()

    async def _expire_sessions(self) -> None:
        """Close sessions when their time runs out, so the log and the stream report it on time."""
        while True:
            self._sessions_changed.clear()
            due = self.stations.next_expiry()
            timeout = None if due is None else max(0.0, due - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sessions_changed.wait(), timeout)
            expired = self.stations.expire(time.monotonic())
            if expired:
                self._publish_sessions(expired)

    # --- HTTP ----------------------------------------------------------------------------

    def devices_snapshot(self) -> dict[str, Any]:
        """Return the configured devices with their health, and the open sessions."""
        devices = []
        for device in self._devices.values():
            state = self.runtime.devices.get(device.name)
            if state is None:
                continue
            devices.append(self._health_data(device, state))
        now = time.monotonic()
        sessions = [
            {
                "station": session.station,
                "associate": session.associate,
                "openedAt": _iso(session.opened_at),
                "expiresInSeconds": round(max(0.0, session.expires_at - now), 1),
            }
            for session in self.stations.sessions()
        ]
        return {"devices": devices, "sessions": sessions}

    def health_frames(self) -> list[bytes]:
        return [
            encode_event("device.health", self._health_data(device, state))
            for device in self._devices.values()
            if (state := self.runtime.devices.get(device.name)) is not None
        ]


LOCAL_KEY = web.AppKey("local", LocalScanning)


def _forbidden(request: web.Request) -> web.Response | None:
    local = request.app[LOCAL_KEY]
    networks = local.config.local.allow_networks
    if client_allowed(request.remote, networks):
        return None
    # Imported here because daemon.api imports this module to register the routes.
    from daemon.api import problem_response

    log.warning("local.client_rejected", path=request.path, peer=request.remote)
    return problem_response(
        403,
        "forbidden",
        "Forbidden",
        f"client {request.remote} is not in [local] allow_networks"
        f" ({', '.join(networks)}); add its network there to allow it",
    )


async def local_events(request: web.Request) -> web.StreamResponse:
    rejection = _forbidden(request)
    if rejection is not None:
        return rejection
    local = request.app[LOCAL_KEY]
    settings = local.config.local
    return await stream(
        request,
        local.hub,
        queue_size=settings.events_queue_size,
        keepalive=settings.events_keepalive,
        initial=local.health_frames(),
    )


async def local_devices(request: web.Request) -> web.Response:
    rejection = _forbidden(request)
    if rejection is not None:
        return rejection
    return web.json_response(request.app[LOCAL_KEY].devices_snapshot())


async def _close_streams(app: web.Application) -> None:
    # Runs before aiohttp waits for in-flight handlers, which an open stream would hold up.
    app[LOCAL_KEY].hub.close()


def add_local_routes(app: web.Application, runtime: Runtime) -> None:
    """Add the local scanning state and its endpoints to the app."""
    app[LOCAL_KEY] = LocalScanning(runtime)
    app.router.add_get(EVENTS_PATH, local_events)
    app.router.add_get(DEVICES_PATH, local_devices)
    app.on_shutdown.append(_close_streams)
