"""The `serve` lifecycle: open the store, bind the listener, notify systemd, run, drain.

Signals: SIGTERM and SIGINT stop the daemon gracefully (stop accepting, finish in-flight
requests, flush the writer); SIGHUP rereads the configuration and keeps the running one when
the new file is invalid.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import signal
import sqlite3
import time
from pathlib import Path

import structlog
from aiohttp import web

from daemon import installed_version, sdnotify, security
from daemon.api import build_app
from daemon.config import Config, ConfigError, HqConfig
from daemon.hq import settings_from_config, start_sync
from daemon.local import LOCAL_KEY
from daemon.metrics import Metrics
from daemon.resolver import Resolver, prune_decisions
from daemon.runtime import Runtime
from daemon.security import ADMISSION_KEY
from daemon.store import (
    NO_ROWS,
    CheckInterrupted,
    DatabaseChange,
    OpenedDatabase,
    ServeLock,
    Store,
    StoreError,
    check_integrity,
    check_marker,
    open_reader,
    prepare_database_path,
    restore_secret,
    save_open_database,
)

log = structlog.get_logger(__name__)

PRUNE_INTERVAL = 3600.0
STATUS_INTERVAL = 30.0
# Seconds between checks that [database] path still names the database file the daemon opened.
DATABASE_CHECK_INTERVAL = 1.0
# While the database opens before READY, systemd is asked every START_EXTEND_INTERVAL
# seconds for START_EXTEND_SECONDS more, for at most START_EXTEND_LIMIT seconds in all.
START_EXTEND_SECONDS = 30.0
START_EXTEND_INTERVAL = 10.0
START_EXTEND_LIMIT = 3600.0
# After SIGTERM the listener closes at once, but open connections stay open for up to
# STOP_GRACE seconds, so a request already sent on one gets a 503 instead of a closed
# connection. The stop ends the grace early once every connection has closed.
STOP_GRACE = 1.0
STOP_GRACE_POLL_INTERVAL = 0.05
# After the grace, requests in flight get this long to finish before their connections
# close. The unit's TimeoutStopSec (30 s) leaves room for the grace, this timeout and the
# writer flush after them.
SHUTDOWN_TIMEOUT = 10.0


def check_listener_safety(config: Config) -> None:
    """Reject a listener that would admit clients off this host without authentication."""
    security.check_listener_safety(config)


async def serve(config: Config, config_path: Path | None = None) -> None:
    """Run the daemon until SIGTERM or SIGINT, then finish in-flight requests and stop."""
    check_listener_safety(config)
    security.log_listener_warnings(config)
    if config.hq is not None:
        # The sync starts after READY. Checking its settings here makes a wrong store_id or
        # a missing HQ file exit before READY, which systemd reports as a failed start.
        settings_from_config(config, config.hq)
    database = Path(config.database.path)
    prepare_database_path(database)
    serve_lock = ServeLock(database)
    serve_lock.acquire()
    try:
        await _serve_database(config, config_path, database)
    finally:
        serve_lock.release()


async def _serve_database(config: Config, config_path: Path | None, database: Path) -> None:
    # A migration or a full integrity check of millions of identities can outlast the
    # unit's start timeout (95 s to migrate 10,000,000 identities on the benchmark machine).
    with sdnotify.extending_timeout(
        START_EXTEND_SECONDS,
        START_EXTEND_INTERVAL,
        START_EXTEND_LIMIT,
        "opening the database (integrity check, or migration after an upgrade)",
    ):
        store = Store.open(
            database,
            config.database.secret_path,
            config.database.busy_timeout,
            config.database.synchronous,
        )
    try:
        await _serve_with_store(config, config_path, store)
    finally:
        store.close()
    log.info("server.stopped")


def _export_hq_client_certificate(runtime: Runtime) -> None:
    """Give the metrics the HQ client certificate, as the sync loads it once at its start."""
    hq = runtime.config.hq
    if hq is None or not hq.url.startswith("https://") or not hq.client_cert_file:
        return
    try:
        pem = Path(hq.client_cert_file).read_bytes()
    except OSError:
        # settings_from_config has read it just before; a file gone since only loses this.
        return
    runtime.certificates["hq_client"] = lambda: pem


async def _serve_with_store(config: Config, config_path: Path | None, store: Store) -> None:
    # Recorded first, so a file deleted or replaced during the rest of the start is noticed.
    opened = OpenedDatabase.record(store.path)
    metrics = Metrics()
    runtime = Runtime(
        config=config,
        store=store,
        resolver=Resolver(store, config, metrics),
        config_path=config_path,
    )
    metrics.attach(runtime)
    _export_hq_client_certificate(runtime)
    app = build_app(runtime, metrics)
    admission = app[security.ADMISSION_KEY]
    runtime.reload_hooks.append(admission.apply)
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        **security.handler_options(config.server),
    )
    await runner.setup()
    site = web.TCPSite(
        runner,
        config.server.host,
        config.server.port,
        reuse_address=True,
        ssl_context=admission.ssl_context,
    )
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            f"cannot listen on {config.server.host}:{config.server.port}: {exc.strerror};"
            " stop the other process on that port or change [server] port"
        ) from None

    log.info(
        "server.started",
        version=installed_version(),
        host=config.server.host,
        port=config.server.port,
        database=str(store.path),
    )
    local = app[LOCAL_KEY]
    await local.start()
    # The objects made during start-up live as long as the process. Freezing them keeps them
    # out of the collector's full passes, which pause every request, so the passes stay short.
    gc.freeze()
    sdnotify.ready(status_line(runtime))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, functools.partial(_reload, runtime))

    # Strong references: the loop keeps only weak ones to running tasks.
    tasks = [
        asyncio.create_task(_prune_periodically(runtime), name="prune-decisions"),
        asyncio.create_task(_report_status(runtime), name="systemd-status"),
    ]
    if store.check_deferred:
        tasks.append(
            asyncio.create_task(_check_in_background(runtime, stop), name="integrity-check")
        )
    tasks.append(
        asyncio.create_task(_watch_database_file(runtime, stop, opened), name="database-watch")
    )
    interval = sdnotify.watchdog_interval()
    if interval is not None:
        tasks.append(
            asyncio.create_task(_watchdog(runtime, site, interval), name="systemd-watchdog")
        )
    hq = None
    try:
        hq = await start_sync(
            config, store, on_state=functools.partial(setattr, runtime, "hq_state")
        )
        runtime.resolver.hq = hq
        if hq is not None:
            # A reload also pulls at once: the way to lift a stale cache after fixing HQ.
            runtime.reload_hooks.append(lambda _config: hq.pull_now())
        await stop.wait()
    finally:
        log.info("server.stopping")
        sdnotify.stopping()
        # From here on a request not admitted yet gets 503 with Retry-After, and every
        # response carries Connection: close. site.stop() closes the listening socket before
        # it yields to the event loop, so no client reads Connection: close and reconnects
        # while the listener still accepts.
        app[ADMISSION_KEY].stopping.set()
        # NOTE: closing the listener resets a connection still in its accept backlog, so a
        # request sent on such a connection gets no response.
        await site.stop()
        grace_ends = loop.time() + STOP_GRACE
        for task in tasks:
            task.cancel()
        # The default action of SIGTERM, SIGINT and SIGHUP ends the process, so a second
        # signal would cut the drain short. During the drain such a signal is only logged.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, _signal_while_stopping, signum)
        # Drivers stop before runner.cleanup() closes the connections, so no scan is decided
        # while they close.
        await local.stop()
        # runner.cleanup() stops reading every open connection at once and closes the idle
        # ones (aiohttp 3.14), so a request still on its way would meet a closed connection.
        # The grace lets it arrive and get its 503. A connection closes by itself after its
        # next response, which carries Connection: close.
        assert runner.server is not None
        while runner.server.connections and loop.time() < grace_ends:
            await asyncio.sleep(STOP_GRACE_POLL_INTERVAL)
        log.info(
            "server.draining",
            open_connections=len(runner.server.connections),
            rejected_requests=app[ADMISSION_KEY].rejected_while_stopping,
        )
        # Waits up to SHUTDOWN_TIMEOUT for handlers in progress, then closes every connection.
        await runner.cleanup()
        if hq is not None:
            await hq.stop()
        await _save_if_database_changed(runtime, opened)
    if runtime.failure:
        raise StoreError(runtime.failure)


async def _check_in_background(runtime: Runtime, stop: asyncio.Event) -> None:
    """Check a large database after start-up; on failure stop, so the next start repairs it."""
    store = runtime.store
    timeout = runtime.config.database.busy_timeout
    started = time.monotonic()
    connections: list[sqlite3.Connection] = []
    # Both files: the database, and the cache file that was in use at start-up.
    damaged: Path | None = None
    try:
        for path in (store.path, store.cache.path):
            if path != store.path and path != store.cache.path:
                continue  # a rebuild replaced the cache file meanwhile
            if not await asyncio.to_thread(
                check_integrity, path, timeout, True, connections.append
            ):
                damaged = path
                break
    except asyncio.CancelledError:
        # A stop during the check interrupts it: the check of millions of identities takes
        # longer than a service manager waits for a stop. The next start checks again.
        for connection in connections:
            connection.interrupt()
        raise
    except CheckInterrupted:
        return
    if damaged is None:
        log.info("store.integrity_ok", seconds=round(time.monotonic() - started, 1))
        return
    check_marker(store.path).touch()
    kind = "database" if damaged == store.path else "identity cache file"
    runtime.failure = f"{kind} {damaged} failed its integrity check"
    log.error(
        "store.integrity_failed_stopping",
        path=str(damaged),
        detail="stopping; the next start moves the file aside and starts with an empty cache",
    )
    stop.set()


async def _watch_database_file(
    runtime: Runtime, stop: asyncio.Event, opened: OpenedDatabase
) -> None:
    """Stop the daemon once [database] path no longer names the database file it opened.

    SQLite keeps committing to a deleted file, and every decision would be lost when the
    process exits. The stop copies the open database back (``_save_if_database_changed``).
    """
    check_failed = False
    while True:
        await asyncio.sleep(DATABASE_CHECK_INTERVAL)
        try:
            change = opened.change()
        except OSError as exc:
            if not check_failed:
                log.warning("store.database_check_failed", path=str(opened.path), error=str(exc))
            check_failed = True
            continue
        if check_failed:
            log.info("store.database_check_recovered", path=str(opened.path))
        check_failed = False
        if change is not None:
            _report_database_change(runtime, opened.path, change)
            stop.set()
            return


def _report_database_change(runtime: Runtime, path: Path, change: DatabaseChange) -> None:
    runtime.failure = f"database {path} was {change} while the daemon served it"
    if change == "deleted":
        log.error(
            "store.database_deleted",
            path=str(path),
            detail="stopping; once the decisions in flight have committed, the open database"
            " is copied back to this path, and the next start serves it",
        )
    else:
        log.error(
            "store.database_replaced",
            path=str(path),
            detail="stopping; once the decisions in flight have committed, the open database"
            " is copied beside this path as <name>.deleted-<UTC time>, and the next start"
            " serves the file now at this path",
        )


async def _save_if_database_changed(runtime: Runtime, opened: OpenedDatabase) -> None:
    """Copy the open database to a file when its path no longer names it, after the drain."""
    try:
        change = opened.change()
    except OSError as exc:
        log.warning("store.database_check_failed", path=str(opened.path), error=str(exc))
        return
    if change is None:
        return
    if runtime.failure is None:
        # Changed during a stop that a signal began, after the watch task's last check.
        _report_database_change(runtime, opened.path, change)

    store = runtime.store
    if store.writer.alive:
        try:
            # Jobs run in order, so every job queued before this one has committed after it.
            await store.writer.submit(NO_ROWS)
        except Exception as exc:
            log.warning("store.writer_flush_failed", error=str(exc))
    if change == "deleted":
        # rm connector.sqlite3* deletes the secret too, and the copy needs it to start.
        try:
            restore_secret(runtime.config.database.secret_path, store.hasher.secret)
        except StoreError as exc:
            log.error("store.secret_restore_failed", error=str(exc))
    try:
        saved = await asyncio.to_thread(save_open_database, store.reader.connection, opened)
    except StoreError as exc:
        # The copy is complete, and the message names it and what to do.
        log.error("store.database_save_failed", path=str(opened.path), error=str(exc))
        return
    except (sqlite3.Error, OSError) as exc:
        log.error(
            "store.database_save_failed",
            path=str(opened.path),
            error=str(exc),
            detail="the decisions and audit events of the open database are lost when the"
            " daemon exits; restore the database from a backup",
        )
        return
    if saved == opened.path:
        log.warning(
            "store.database_restored",
            path=str(saved),
            detail="the next start serves this copy, with its decisions, its audit outbox and"
            " the cache file it names",
        )
    else:
        log.warning(
            "store.database_saved_aside",
            path=str(saved),
            database=str(opened.path),
            detail="the next start serves the file now at the database path. To serve the"
            " saved copy instead, stop the service, move that file aside, and move the copy"
            " to the database path",
        )


def _signal_while_stopping(signum: int) -> None:
    log.info("server.signal_ignored", signal=signal.Signals(signum).name, reason="stopping")


def _reload(runtime: Runtime) -> None:
    sdnotify.reloading()
    runtime.reload()
    sdnotify.ready(status_line(runtime))


def status_line(runtime: Runtime) -> str:
    """Build the one-line state that `systemctl status` shows."""
    devices = runtime.devices
    available = sum(1 for device in devices.values() if device.available)
    cache = "stale" if runtime.resolver.cache_stale(time.time()) else "fresh"
    count = runtime.identity_count
    size = f"{count:,} identities" if count is not None else "identities being counted"
    return (
        f"serving {runtime.config.server.host}:{runtime.config.server.port};"
        f" cache {cache}, {size}; HQ {runtime.hq_state};"
        f" devices {available}/{len(devices)} available"
    )


async def _report_status(runtime: Runtime) -> None:
    store = runtime.store
    timeout = runtime.config.database.busy_timeout
    while True:
        # Counting millions of rows takes longer than a decision may wait, so a thread does it.
        try:
            runtime.identity_count = await asyncio.to_thread(_count_identities, store.path, timeout)
        except sqlite3.Error as exc:
            log.warning("store.count_failed", error=str(exc))
        sdnotify.status(status_line(runtime))
        await asyncio.sleep(STATUS_INTERVAL)


def _count_identities(path: Path, busy_timeout: float) -> int:
    connection = open_reader(path, busy_timeout)
    try:
        return connection.execute("SELECT count(*) FROM identities").fetchone()[0]
    finally:
        connection.close()


async def _watchdog(runtime: Runtime, site: web.TCPSite, interval: float) -> None:
    """Ping systemd's watchdog only while the loop, the writer and the listener work.

    The ping is sent from this task, so a blocked event loop stops the pings by itself; a
    writer that cannot commit an empty job within the interval, or a closed listener, stops
    them too, and systemd restarts the daemon.
    """
    unhealthy_reason: str | None = None
    while True:
        started = time.monotonic()
        reason = await _health_problem(runtime, site, interval)
        if reason is None:
            sdnotify.watchdog()
            if unhealthy_reason is not None:
                log.info("watchdog.healthy")
        elif reason != unhealthy_reason:
            log.error("watchdog.unhealthy", reason=reason, detail="watchdog pings withheld")
        unhealthy_reason = reason
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))


async def _health_problem(runtime: Runtime, site: web.TCPSite, timeout: float) -> str | None:
    writer = runtime.store.writer
    if not writer.alive:
        return "database writer stopped"
    try:
        await asyncio.wait_for(writer.submit(NO_ROWS), timeout)
    except TimeoutError:
        return "database writer did not commit within the watchdog interval"
    except Exception as exc:
        return f"database writer failed: {exc}"
    server = getattr(site, "_server", None)
    if server is None or not server.is_serving():
        return "listener closed"
    return None


async def _prune_periodically(runtime: Runtime) -> None:
    store = runtime.store
    while True:
        now = time.time()
        cutoff = now - runtime.config.policy.idempotency_retention
        try:
            removed = await store.writer.submit(
                functools.partial(prune_decisions, older_than=cutoff)
            )
            dropped = 0
            if runtime.config.hq is None:
                dropped = await store.writer.submit(
                    functools.partial(_bound_outbox_without_hq, now=now)
                )
        except Exception as exc:
            log.error("store.prune_failed", error=str(exc))
        else:
            if removed:
                log.info("store.decisions_pruned", removed=removed)
            if dropped:
                log.warning("outbox.trimmed_without_hq", dropped=dropped)
        await asyncio.sleep(PRUNE_INTERVAL)


def _bound_outbox_without_hq(connection: sqlite3.Connection, now: float) -> int:
    """Keep the outbox within the [hq] defaults when no HQ drains it, dropping the oldest."""
    # Imported here: daemon.hq brings in the HQ client, which a box without [hq] never uses.
    from daemon.hq import trim_outbox

    limits = HqConfig(url="http://127.0.0.1")
    return trim_outbox(
        connection, limits.outbox_max_events, limits.outbox_max_age, "drop_oldest", now
    )
