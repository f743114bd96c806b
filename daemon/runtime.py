"""State shared by the running daemon's parts, and configuration reload on SIGHUP."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import structlog

from daemon import security
from daemon.config import Config, ConfigError, load_config
from daemon.resolver import Resolver
from daemon.store import Store

log = structlog.get_logger(__name__)

# Sections bound at start: the listener, the database, the HQ sync loops and the log
# output keep the values they started with.
RESTART_ONLY_SECTIONS = ("server", "database", "hq", "logging")

ReloadHook = Callable[[Config], None]


def changed_settings(old: Config, new: Config) -> list[str]:
    """Name each setting whose value differs between two configurations.

    Keys are dotted (``policy.max_scan_age``); a whole table that was added or removed is
    named alone (``auth``), and device tables are named by their ``name``
    (``devices[front-door].baudrate``). Only names are returned, never values, so the list
    can be logged even when a value is secret.
    """
    changed: list[str] = []
    # Duration is a float subclass, which msgspec leaves to the hook.
    old_values = msgspec.to_builtins(old, enc_hook=float)
    new_values = msgspec.to_builtins(new, enc_hook=float)
    _diff(old_values, new_values, "", changed)
    return changed


def _diff(old: Any, new: Any, path: str, changed: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(key for key in new if key not in old)]:
            _diff(old.get(key), new.get(key), f"{path}.{key}" if path else key, changed)
        return
    if path == "devices" and isinstance(old, list) and isinstance(new, list):
        old_tables = _tables_by_name(old)
        new_tables = _tables_by_name(new)
        if old_tables is not None and new_tables is not None:
            for name in [*old_tables, *(name for name in new_tables if name not in old_tables)]:
                table_path = f"devices[{name}]"
                if name in old_tables and name in new_tables:
                    _diff(old_tables[name], new_tables[name], table_path, changed)
                else:
                    changed.append(table_path)
            return
    if old != new:
        changed.append(path)


def _tables_by_name(tables: list[Any]) -> dict[str, Any] | None:
    """Index device tables by name, or return None when a table has no name or two share one."""
    named = {table.get("name"): table for table in tables if isinstance(table, dict)}
    if len(named) != len(tables) or not all(isinstance(name, str) for name in named):
        return None
    return named


@dataclass
class DeviceState:
    available: bool
    error: str | None = None
    since: float = field(default_factory=time.time)


@dataclass
class Runtime:
    """The running daemon: its configuration, store, resolver, and the state health reports."""

    config: Config
    store: Store
    resolver: Resolver
    config_path: Path | None = None
    started_at: float = field(default_factory=time.time)
    hq_state: str = "not configured"
    devices: dict[str, DeviceState] = field(default_factory=dict)
    identity_count: int | None = None
    """Identities in the cache at the last count; None until the first count finishes."""
    failure: str | None = None
    """Reason the daemon stopped itself; ``serve`` then exits non-zero."""
    reload_hooks: list[ReloadHook] = field(default_factory=list)
    """Called with the new configuration after a reload; raising rejects the reload."""
    certificates: dict[str, Callable[[], bytes | None]] = field(default_factory=dict)
    """The PEM of each certificate the daemon presents, by name, as in use now."""

    def reload(self) -> bool:
        """Reread the configuration file; keep the running one when the new one is invalid."""
        if self.config_path is None:
            log.warning("config.reload_skipped", detail="the daemon was started without a file")
            return False
        try:
            new = load_config(self.config_path)
            # Checked on the file as written: the running [server] stays until a restart,
            # but the next start would refuse this file, and the reload is the last warning.
            security.check_listener_safety(new)
        except ConfigError as exc:
            log.error("config.reload_failed", error=str(exc), kept="the running configuration")
            return False

        changed = changed_settings(self.config, new)
        restart_only = [
            section
            for section in RESTART_ONLY_SECTIONS
            if getattr(new, section) != getattr(self.config, section)
        ]
        if restart_only:
            log.warning(
                "config.restart_required",
                sections=restart_only,
                settings=[key for key in changed if key.split(".")[0] in restart_only],
                detail="these sections keep their running values until the next restart",
            )
            changed = [key for key in changed if key.split(".")[0] not in restart_only]
            new = msgspec.structs.replace(
                new, **{section: getattr(self.config, section) for section in restart_only}
            )

        old = self.config
        try:
            for hook in self.reload_hooks:
                hook(new)
        except Exception as exc:
            log.error("config.reload_failed", error=str(exc), kept="the running configuration")
            for hook in self.reload_hooks:
                try:
                    hook(old)
                except Exception:
                    log.exception("config.restore_failed")
            return False
        self.config = new
        self.resolver.config = new
        log.info("config.reloaded", path=str(self.config_path), changed=changed)
        return True
