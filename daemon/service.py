"""The `serve` lifecycle: open the store, bind the listener, run until a signal, drain."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import signal
import time
from pathlib import Path

import structlog
from aiohttp import web

from daemon.api import build_app
from daemon.config import Config, ConfigError
from daemon.resolver import Resolver, prune_decisions
from daemon.store import Store

log = structlog.get_logger(__name__)

PRUNE_INTERVAL = 3600.0
# In-flight requests get this long to finish after SIGTERM before their connections close.
SHUTDOWN_TIMEOUT = 10.0


def check_listener_safety(config: Config) -> None:
    """Reject settings this release cannot serve safely, naming the setting to change."""
    if config.tls is not None or config.auth is not None:
        raise ConfigError(
            "[tls] and [auth] are not supported by this release yet: remove those tables and"
            " keep [server] host on a loopback address, or put a TLS-terminating proxy with"
            " authentication in front of the connector"
        )
    try:
        loopback = ipaddress.ip_address(config.server.host).is_loopback
    except ValueError:
        loopback = config.server.host == "localhost"
    if not loopback:
        raise ConfigError(
            f"[server] host = {config.server.host!r} would expose the connector without"
            " authentication: set host to 127.0.0.1 or ::1"
        )


async def serve(config: Config) -> None:
    """Run the daemon until SIGTERM or SIGINT, then finish in-flight requests and stop."""
    check_listener_safety(config)
    log.warning(
        "server.unauthenticated",
        host=config.server.host,
        detail="no [tls] or [auth] configured; serving plain HTTP on loopback only",
    )
    store = Store.open(
        Path(config.database.path), config.database.secret_path, config.database.busy_timeout
    )
    try:
        await _serve_with_store(config, store)
    finally:
        store.close()
    log.info("server.stopped")


async def _serve_with_store(config: Config, store: Store) -> None:
    resolver = Resolver(store, config)
    app = build_app(config, resolver)
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT
    )
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port, reuse_address=True)
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
        host=config.server.host,
        port=config.server.port,
        identities=store.reader.count("identities"),
        database=str(store.path),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    pruner = asyncio.create_task(_prune_periodically(config, store), name="prune-decisions")
    try:
        await stop.wait()
    finally:
        log.info("server.stopping")
        pruner.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await runner.cleanup()


async def _prune_periodically(config: Config, store: Store) -> None:
    retention = config.policy.idempotency_retention
    while True:
        cutoff = time.time() - retention
        try:
            removed = await store.writer.submit(
                functools.partial(prune_decisions, older_than=cutoff)
            )
        except Exception as exc:
            log.error("store.prune_failed", error=str(exc))
        else:
            if removed:
                log.info("store.decisions_pruned", removed=removed)
        await asyncio.sleep(PRUNE_INTERVAL)
