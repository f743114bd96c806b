"""The `identity-connector` command.

Subcommands: serve, import, lookup, status, sync, devices, check-config and curl-example.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sqlite3
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

import uvloop

from daemon import installed_version, security
from daemon.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from daemon.curl_example import curl_example
from daemon.identities import check_records_file, import_file
from daemon.journal import stdout_is_journal
from daemon.logs import configure_logging
from daemon.recordfile import ImportFileError
from daemon.resolver import Resolver
from daemon.schema import CHANNELS, LOCATIONS
from daemon.store import (
    LAST_PULL_META_KEY,
    META_TIME_MAX_AHEAD,
    RUNUSER_COMMAND,
    SERVICE_USER,
    Store,
    StoreError,
    current_user,
    parse_meta_time,
    permission_denied_message,
)

MAX_PRINTED_ERRORS = 100
# Installed paths of the README with the configuration reference, and of the commented
# template of every key (systemd/config.toml in the source tree), from systemd/install.sh.
INSTALLED_README = "/opt/identity-connector/README.md"
INSTALLED_TEMPLATE = "/opt/identity-connector/config.toml.example"


class _VersionAction(argparse.Action):
    """Print the installed version and exit, as argparse's "version" action does.

    The version is looked up only when the option is given, not for every command.
    """

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(f"{parser.prog} {installed_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="identity-connector",
        description="On-premises Identity Connector for Just Walk Out gates.",
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="print the installed version and exit"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument(
            "--config",
            type=Path,
            default=DEFAULT_CONFIG_PATH,
            help=f"configuration file (default: {DEFAULT_CONFIG_PATH})",
        )
        return sub

    with_config(commands.add_parser("serve", help="run the daemon in the foreground"))

    importer = with_config(
        commands.add_parser("import", help="load identity records from JSON Lines or CSV")
    )
    importer.add_argument("file", type=Path, help="records file (.jsonl, .ndjson or .csv)")
    importer.add_argument(
        "--format", choices=["jsonl", "csv"], help="file format (default: from the extension)"
    )

    lookup = with_config(
        commands.add_parser("lookup", help="print the decision for a value, recording nothing")
    )
    lookup.add_argument("value", help="scanned value; '-' reads it from standard input")
    lookup.add_argument("--store", help="store id (default: the first configured store)")
    lookup.add_argument("--location", choices=LOCATIONS, default="ENTRY", help="default: ENTRY")
    lookup.add_argument("--channel", choices=CHANNELS, default="OPTICAL", help="default: OPTICAL")

    status = with_config(commands.add_parser("status", help="print cache, sync and outbox state"))
    status.add_argument("--json", action="store_true", help="print JSON instead of text")

    sync = with_config(
        commands.add_parser("sync", help="pull changes from HQ and upload events, once")
    )
    sync.add_argument(
        "--now",
        action="store_true",
        required=True,
        help="pull to HQ's latest cursor and upload the whole outbox in the foreground",
    )

    with_config(
        commands.add_parser(
            "devices", help="list the scanners this box sees and the configured ones' health"
        )
    )

    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument(
        "file",
        type=Path,
        help="the TOML configuration to check, such as /etc/identity-connector/config.toml;"
        " every problem is listed with its line and key",
    )

    with_config(
        commands.add_parser(
            "curl-example",
            help="print a curl command that sends a sample scan to the configured listener",
        )
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Scripts parse the output of `status --json`, so its errors are JSON on stdout too.
    errors_as_json = args.command == "status" and args.json
    _restrict_new_files()
    try:
        if args.command == "check-config":
            return _check_config(args.file)
        config = _load_config(args.config)
        configure_logging(
            config.logging.level,
            config.logging.format,
            stream=sys.stdout if args.command == "serve" else sys.stderr,
            journal_socket=config.logging.journal_socket,
        )
        if args.command == "serve":
            from daemon.service import serve

            # uvloop runs the same asyncio code with a faster event loop and transports.
            uvloop.run(serve(config, args.config))
            return 0
        if args.command == "import":
            return _import(config, args.file, args.format)
        if args.command == "lookup":
            return _lookup(config, args)
        if args.command == "devices":
            from daemon.devices import print_device_inventory

            print_device_inventory(config)
            return 0
        if args.command == "curl-example":
            print(curl_example(config))
            return 0
        if args.command == "sync":
            from daemon.hq import sync_now

            store = _open_store(config)
            try:
                return sync_now(config, store)
            finally:
                store.close()
        return _status(config, args.json)
    except (ConfigError, StoreError) as exc:
        return _print_error(exc, errors_as_json)
    except PermissionError as exc:
        # From a check that the store's own messages do not cover, such as Store.open's first
        # look at a database path in a folder that this user cannot search.
        if exc.filename is None:
            message = f"permission denied for user {current_user()}: {exc}"
        else:
            message = permission_denied_message(
                Path(exc.filename),
                "file",
                f"Run the command as the user that owns it ({RUNUSER_COMMAND} on an installed box)",
                action="access",
            )
        return _print_error(StoreError(message), errors_as_json)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of the output went away, as `status | head` does. Point stdout at
        # /dev/null so that the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as exc:
        if not errors_as_json:
            raise
        # The same exit status and traceback as without --json, where Python prints them.
        traceback.print_exc()
        message = (
            f"unexpected {type(exc).__name__}: {exc}; the traceback is on standard error:"
            " report it with the command and its output"
        )
        _print_json_error(message, "internal")
        return 1


def _print_error(exc: ConfigError | StoreError, as_json: bool) -> int:
    """Print a configuration or database error for store IT and return exit code 2."""
    if as_json:
        kind = "configuration" if isinstance(exc, ConfigError) else "database"
        _print_json_error(str(exc), kind)
        return 2
    # Under systemd the "<3>" prefix files a line at priority err, not info. A
    # ConfigError lists one problem per line, and each line gets the prefix.
    prefix = "<3>" if stdout_is_journal(sys.stderr) else ""
    for line in str(exc).splitlines():
        print(f"{prefix}error: {line}", file=sys.stderr)
    return 2


def _restrict_new_files() -> None:
    """Make the files this process creates readable and writable by their owner only.

    The database and its cache file contain key digests and audit events. The unit's
    UMask=0077 restricts them for the daemon under systemd, but a command run through
    runuser or sudo keeps the caller's umask, usually 0022. A stricter umask stays as it is.
    """
    previous = os.umask(0o077)
    os.umask(previous | 0o077)


def _load_config(path: Path, check_listener: bool = False) -> Config:
    """Load the configuration; a missing or unreadable file gets a message with the fix."""
    try:
        # O_NONBLOCK keeps this probe from waiting for a writer when the path is a FIFO.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(_missing_config_message(path)) from None
    except PermissionError:
        quoted = shlex.quote(str(path))
        raise ConfigError(
            permission_denied_message(
                path,
                "configuration file",
                f"The service reads it through its group {SERVICE_USER}: as root, run"
                f" chown root:{SERVICE_USER} {quoted}; chmod 0640 {quoted}. Then run the"
                f" command as root or as the service user: {RUNUSER_COMMAND}",
            )
        ) from None
    except OSError:
        # Such as a folder given as the file: load_config words the other failures.
        pass
    else:
        os.close(descriptor)
    return load_config(path, check_listener=check_listener)


def _missing_config_message(path: Path) -> str:
    return (
        f"configuration file {path} not found: create it from the commented template that"
        f" lists every key (cp {INSTALLED_TEMPLATE} {shlex.quote(str(path))})."
        " systemd/install.sh installs the template systemd/config.toml there, and as"
        f" {DEFAULT_CONFIG_PATH} at the first install. The configuration reference is in"
        f" {INSTALLED_README}. To use another file, name it with --config FILE, or as the"
        " argument of check-config"
    )


def _print_json_error(message: str, kind: str) -> None:
    """Print an error as the one JSON object of `status --json`.

    ``kind`` is "configuration", "database" or "internal". For the first two, ``message`` is
    the text that `status` without --json prints after "error: ", and it names the fix. For
    "internal", it names the exception, and the caller prints the traceback to standard
    error, where `status` without --json prints only the traceback.
    """
    print(json.dumps({"error": message, "errorKind": kind}, indent=2))


def _check_config(path: Path) -> int:
    """Validate a configuration with the checks `serve` makes when it starts."""
    # The listener's exposure is checked with the rest of the file, so one run lists it too.
    config = _load_config(path, check_listener=True)
    # To stderr, like the other commands: the [hq] check logs a warning when no token is set.
    configure_logging(
        config.logging.level,
        config.logging.format,
        stream=sys.stderr,
        journal_socket=config.logging.journal_socket,
    )
    # Every key, certificate and CA file the listener would read.
    state = security.load_state(config)
    if config.tls is not None and state.tls_material is not None:
        security.warn_certificate_dates(config.tls, state.tls_material)
    if config.hq is not None:
        # Imported here: daemon.hq pulls in the aiohttp client.
        from daemon.hq import settings_from_config

        # The same check `serve` makes before it reports READY: [hq] store_id and the
        # token, client certificate, client key and CA files.
        settings_from_config(config, config.hq)
    print(f"{path}: configuration is valid")
    return 0


def _open_store(config: Config, must_exist: bool = False) -> Store:
    """Open the configured database; read-only commands pass ``must_exist``."""
    path = Path(config.database.path)
    if must_exist and not path.exists():
        # Creating an empty cache here would make lookup return UNKNOWN_KEY for every value.
        raise StoreError(
            f"database {path.resolve()} not found: import identities first, or check"
            " [database] path (a relative path is resolved against the working directory)"
        )
    return Store.open(
        Path(config.database.path),
        config.database.secret_path,
        config.database.busy_timeout,
        config.database.synchronous,
        # The read-only commands report damage and an older schema: repairing and migrating
        # are the daemon's job. An empty cache would make lookup return UNKNOWN_KEY for every
        # value, and a migration under a running daemon of the older release breaks it.
        repair=not must_exist,
    )


def _import_file_error(path: Path, error: ImportFileError) -> int:
    place = f"{path}:{error.line}" if error.line is not None else str(path)
    print(f"error: {place}: {error}. Nothing was imported.", file=sys.stderr)
    return 2


def _import(config: Config, path: Path, file_format: str | None) -> int:
    problem = None
    if path.is_dir():
        problem = "is a directory: name a records file (.jsonl, .ndjson or .csv) in it"
    elif not path.exists():
        problem = "not found"
    elif not path.is_file():
        # Import reads the first bytes twice, which a pipe cannot do.
        problem = "is not a regular file (a pipe or a device): save the records to a file first"
    if problem is not None:
        print(f"error: records file {path} {problem}", file=sys.stderr)
        return 2
    try:
        check_records_file(path, file_format)
    except ImportFileError as exc:
        return _import_file_error(path, exc)
    store = _open_store(config)
    try:
        summary = import_file(
            store.reader.connection,
            store.hasher,
            path,
            file_format,
            progress=sys.stderr.isatty(),
        )
    except ImportFileError as exc:
        return _import_file_error(path, exc)
    except sqlite3.OperationalError as exc:
        # Such as a cache file whose write lock another import or `sync --now` kept for
        # longer than database.busy_timeout. Each batch commits on its own.
        print(
            f"error: import of {path} stopped on the database {store.path}: {exc}. The batches"
            " committed before stay imported; run the import again once the other writer"
            " has finished, or raise database.busy_timeout",
            file=sys.stderr,
        )
        return 2
    finally:
        store.close()

    for error in summary.errors[:MAX_PRINTED_ERRORS]:
        print(f"{path}:{error.line}: rejected: {error.reason}", file=sys.stderr)
    if len(summary.errors) > MAX_PRINTED_ERRORS:
        print(f"... and {len(summary.errors) - MAX_PRINTED_ERRORS} more", file=sys.stderr)
    accepted = summary.inserted + summary.updated + summary.duplicates
    rate = accepted / summary.seconds if summary.seconds else 0.0
    line = (
        f"imported {path}: {summary.inserted} inserted, {summary.updated} updated,"
        f" {summary.rejected} rejected in {summary.seconds:.1f} s ({rate:,.0f} records/s)"
    )
    if summary.replaced_keys == 1:
        line += "; 1 older credential gave up its key"
    elif summary.replaced_keys:
        line += f"; {summary.replaced_keys} older credentials gave up their key"
    if summary.duplicates == 1:
        line += (
            "; 1 line repeated the credentialId of an earlier line (at line"
            f" {summary.first_duplicate_line}), and that later line was imported"
        )
    elif summary.duplicates:
        line += (
            f"; {summary.duplicates} lines repeated the credentialId of an earlier line (first"
            f" at line {summary.first_duplicate_line}), and the last line of each was imported"
        )
    print(line)
    if config.hq is not None:
        # HQ owns the identities: the digest comparison finds the imported records that
        # differ from HQ's and rebuilds the cache from HQ's snapshot without them.
        print(
            "warning: [hq] is configured, so HQ sync keeps the cache equal to HQ's records:"
            " imported records that HQ does not have are removed at the next reconciliation"
            " or snapshot rebuild. Add them at HQ, or import only on a box without [hq].",
            file=sys.stderr,
        )
    if summary.inserted + summary.updated + summary.rejected == 0:
        # An export that failed half-way often leaves an empty file or a header alone.
        print(
            f"warning: {path} contains no records: it is empty, or contains only a byte order"
            " mark, blank lines or a CSV header. Check the export that wrote it.",
            file=sys.stderr,
        )
        return 1
    return 1 if summary.rejected else 0


def _lookup(config: Config, args: argparse.Namespace) -> int:
    value = sys.stdin.readline() if args.value == "-" else args.value
    store_id = args.store or config.stores.ids[0]
    if store_id not in config.stores.ids:
        # The daemon rejects such a request with 400 instead of deciding it.
        print(
            f"error: store {store_id!r} is not served by this connector; it serves"
            f" {', '.join(config.stores.ids)} ([stores] ids)",
            file=sys.stderr,
        )
        return 2
    store = _open_store(config, must_exist=True)
    try:
        resolver = Resolver(store, config)
        now = time.time()
        evaluation = resolver.evaluate(value, store_id, args.location, args.channel, now, now)
    finally:
        store.close()
    identity = evaluation.identity
    verdict = evaluation.verdict
    print(f"action:      {verdict.action}")
    print(f"reason:      {verdict.reason.value}")
    if verdict.overridden:
        print(f"overridden:  {', '.join(r.value for r in verdict.overridden)}")
    print(f"id:          {identity.id if identity else '(unknown key)'}")
    print(f"type:        {identity.type if identity else '-'}")
    print(f"credential:  {identity.credential_id if identity else '-'}")
    print(f"fingerprint: {evaluation.fingerprint}")
    return 0


def _status(config: Config, as_json: bool) -> int:
    # Imported here: daemon.hq pulls in the aiohttp client, which slows every other command.
    from daemon.hq import events_text, hq_status, print_hq_status

    store = _open_store(config, must_exist=True)
    try:
        reader = store.reader
        now = time.time()
        oldest = reader.oldest_outbox_time()
        stored_last_pull = reader.meta(LAST_PULL_META_KEY)
        # Parsed as the daemon parses it, so a time far ahead of the clock counts as invalid.
        last_pull = parse_meta_time(stored_last_pull, now)
        state = {
            "version": installed_version(),
            "database": str(store.path),
            "cacheFile": str(store.cache.path),
            "identities": reader.count("identities"),
            "decisionsRetained": reader.count("decisions"),
            "outboxDepth": reader.count("outbox"),
            "outboxOldestAgeSeconds": round(now - oldest, 1) if oldest else None,
            "hq": config.hq.url if config.hq else None,
            "syncCursor": reader.meta("cursor"),
            "lastPull": _iso(last_pull) if last_pull is not None else None,
            "cacheStale": Resolver(store, config).cache_stale(now),
            **hq_status(reader, config, now),
            "devicesConfigured": [device.get("name", "(unnamed)") for device in config.devices],
            **_device_status(config),
            **{f"{name}Bytes": size for name, size in store.file_sizes().items()},
        }
    finally:
        store.close()
    if as_json:
        print(json.dumps(state, indent=2))
        return 0
    print(f"version:        {state['version']}")
    print(f"database:       {state['database']}")
    print(f"cache file:     {state['cacheFile']}")
    print(f"identities:     {state['identities']}")
    print(f"decisions kept: {state['decisionsRetained']} (for idempotent replies)")
    age = state["outboxOldestAgeSeconds"]
    oldest_text = f", oldest {age:.0f} s old" if age is not None else ""
    if config.hq is None:
        print(f"outbox:         {events_text(state['outboxDepth'])} kept, none sent{oldest_text}")
    else:
        print(f"outbox:         {events_text(state['outboxDepth'])} waiting for HQ{oldest_text}")
    if config.hq is None:
        print("hq:             not configured; the cache changes only by import")
    else:
        print(f"hq:             {config.hq.url}")
        print(f"sync cursor:    {state['syncCursor'] or '(none yet)'}")
        if state["lastPull"] is None and stored_last_pull:
            # Written by hand or damaged: the daemon stores a Unix time.
            ahead = META_TIME_MAX_AHEAD / 3600
            print(
                "last pull:      unknown: the stored time is not a valid Unix time, or lies"
                f" more than {ahead:.0f} hours ahead of the clock. The next successful pull"
                " replaces it, and until then the cache counts as stale"
            )
        else:
            print(f"last pull:      {state['lastPull'] or 'never'}")
        cache = "STALE: only associates are accepted" if state["cacheStale"] else "fresh"
        print(f"cache:          {cache}")
        print_hq_status(state)
    if not state["devicesConfigured"]:
        print("devices:        none configured")
        return 0
    configured = len(state["devices"])
    print(f"devices:        {configured} configured; health: {state['devicesHealthSource']}")
    for device in state["devices"]:
        if device["available"] is None:
            health = "no health known"
        elif device["available"]:
            health = f"available since {device['since']}"
        else:
            health = f"UNAVAILABLE since {device['since']}: {device['error']}"
        print(f"  {device['name']}: {health}")
    return 0


def _device_status(config: Config) -> dict[str, Any]:
    """Return the configured devices with the health the running daemon recorded."""
    if not config.devices:
        return {}
    # Imported here: the device module is needed only when devices are configured.
    from daemon.devices import device_configs, recorded_device_health

    states, source = recorded_device_health(config)
    devices = []
    for device in device_configs(config.devices):
        state = (states or {}).get(device.name)
        devices.append(
            {
                "name": device.name,
                "available": None if state is None else state["available"],
                "since": None if state is None else state["since"],
                "error": None if state is None else state["error"],
            }
        )
    return {"devices": devices, "devicesHealthSource": source}


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


if __name__ == "__main__":
    sys.exit(main())
