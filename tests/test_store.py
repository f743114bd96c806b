"""The SQLite store as operators meet it: migration, rejection, corruption, secret, stored values.

Every test works on real database files in a temporary folder, through the real CLI or a real
daemon subprocess, and inspects the files afterwards with the test's own SQLite connection.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import sqlite3
import stat
import subprocess
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon import cachefile, service
from daemon import store as store_module
from daemon.config import load_config
from daemon.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    CheckInterrupted,
    StoreError,
    check_integrity,
    check_marker,
)
from tests.conftest import SAMPLE_RECORDS, Daemon, free_port, make_daemon, run_cli, write_config
from tests.helpers_store import count_rows, query_all, query_one, run_serve_until_exit

EXPECTED_TABLES = {"decisions", "outbox", "meta"}
EXPECTED_CACHE_TABLES = {"identities", "skipped_records", "cache_meta"}
PAGE_SIZE = 4096


def secret_path(database: Path) -> Path:
    return database.with_name(database.name + ".key")


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def new_daemon(directory: Path) -> Daemon:
    """A daemon with a configuration but no database yet (make_daemon imports first)."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = write_config(directory, port)
    return Daemon(directory, port, config, directory / "daemon.log")


# --- migration ---------------------------------------------------------------------------


@pytest.mark.parametrize("initial", ["no file", "empty file"])
def test_migration_sets_user_version(tmp_path: Path, initial: str) -> None:
    config = write_config(tmp_path, free_port())
    database = tmp_path / "connector.sqlite3"
    if initial == "empty file":
        database.write_bytes(b"")
    records = write_records(tmp_path / "records.jsonl", SAMPLE_RECORDS[:1])

    result = run_cli("import", "--config", str(config), str(records))

    assert result.returncode == 0, result.stderr
    assert query_one(database, "PRAGMA user_version") == SCHEMA_VERSION
    tables = {row[0] for row in query_all(database, "SELECT name FROM main.sqlite_master")}
    assert tables >= EXPECTED_TABLES
    assert not tables & EXPECTED_CACHE_TABLES, "cache tables left in the main database"
    cache_tables = {row[0] for row in query_all(database, "SELECT name FROM cache.sqlite_master")}
    assert cache_tables >= EXPECTED_CACHE_TABLES


def make_old_database(database: Path, version: int) -> None:
    """A database as schema ``version`` left it: identities, a cursor and a skipped record."""
    import sqlite_utils

    connection = sqlite3.connect(database)
    for step in range(1, version + 1):
        MIGRATIONS[step](sqlite_utils.Database(connection), database)
    for number in (1, 2):
        connection.execute(
            "INSERT INTO identities (credential_id, key_hash, identity_id, type, status,"
            " stores, version) VALUES (?, ?, ?, 'SHOPPER', 'ACTIVE', '[\"STORE-001\"]', 3)",
            (f"OLD-{number}", bytes([number]) * 32, f"old-shopper-{number}"),
        )
    connection.execute("INSERT INTO meta (key, value) VALUES ('cursor', '41.7')")
    connection.execute("INSERT INTO meta (key, value) VALUES ('hq_state', 'online')")
    if version >= 2:
        connection.execute("INSERT INTO skipped_records (credential_id, version) VALUES ('BAD', 2)")
    connection.execute(f"PRAGMA user_version = {version}")
    connection.commit()
    connection.close()


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
def test_migration_from_older_version_keeps_rows(tmp_path: Path, version: int) -> None:
    config = write_config(tmp_path, free_port())
    database = tmp_path / "connector.sqlite3"
    make_old_database(database, version)
    secret_path(database).write_text("ab" * 32 + "\n", encoding="ascii")
    secret_path(database).chmod(0o600)
    records = write_records(tmp_path / "records.jsonl", SAMPLE_RECORDS[:2])

    result = run_cli("import", "--config", str(config), str(records))

    assert result.returncode == 0, result.stderr
    assert query_one(database, "PRAGMA user_version") == SCHEMA_VERSION
    assert query_one(database, "SELECT count(*) FROM identities") == 4
    assert query_one(
        database, "SELECT identity_id FROM identities WHERE credential_id = 'OLD-2'"
    ) == ("old-shopper-2")
    assert query_one(database, "SELECT count(*) FROM skipped_records") == (1 if version >= 2 else 0)
    assert query_one(database, "SELECT value FROM cache_meta WHERE key = 'cursor'") == "41.7"
    assert query_one(database, "SELECT count(*) FROM main.meta WHERE key = 'cursor'") == 0
    assert query_one(database, "SELECT value FROM main.meta WHERE key = 'hq_state'") == "online"
    assert len(cachefile.cache_files(database)) == 1


@pytest.mark.parametrize("command", ["status", "lookup"])
def test_read_only_command_leaves_older_schema(tmp_path: Path, command: str) -> None:
    # Between installing a release and restarting the service, the older daemon still
    # serves the database: a migration by `status` would take its tables away.
    config = write_config(tmp_path, free_port())
    database = tmp_path / "connector.sqlite3"
    make_old_database(database, SCHEMA_VERSION - 1)
    before = database.read_bytes()
    arguments = ["KEY-ANY"] if command == "lookup" else []

    result = run_cli(command, "--config", str(config), *arguments)

    assert result.returncode == 2, result.stdout
    assert f"schema version {SCHEMA_VERSION - 1}, older than" in result.stderr
    assert "systemctl restart identity-connector" in result.stderr
    assert database.read_bytes() == before


def make_newer_database(directory: Path, journal_mode: str) -> Daemon:
    """A populated database whose user_version is one past what this build supports."""
    daemon = make_daemon(directory)
    connection = sqlite3.connect(daemon.database, isolation_level=None)
    try:
        connection.execute(f"PRAGMA journal_mode = {journal_mode}")
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    finally:
        connection.close()
    return daemon


Outcome = subprocess.CompletedProcess[str]


def run_serve(daemon: Daemon) -> Outcome:
    return run_serve_until_exit(daemon.config)


def run_import(daemon: Daemon) -> Outcome:
    records = daemon.directory / "records.jsonl"
    return run_cli("import", "--config", str(daemon.config), str(records))


def run_status(daemon: Daemon) -> Outcome:
    return run_cli("status", "--config", str(daemon.config))


COMMANDS: dict[str, Callable[[Daemon], Outcome]] = {
    "serve": run_serve,
    "import": run_import,
    "status": run_status,
}


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
@pytest.mark.parametrize("command", ["serve", "import"])
def test_newer_database_rejected_untouched(tmp_path: Path, command: str, journal_mode: str) -> None:
    daemon = make_newer_database(tmp_path / "newer", journal_mode)
    before = daemon.database.read_bytes()
    files_before = sorted(p.name for p in daemon.directory.iterdir())

    result = COMMANDS[command](daemon)

    assert result.returncode == 2, result.stderr
    assert f"schema version {SCHEMA_VERSION + 1}" in result.stderr
    assert str(daemon.database) in result.stderr
    assert daemon.database.read_bytes() == before, "the refused database file was modified"
    # `serve` takes its lock on an empty file of its own before it reads the database.
    files_after = [p.name for p in daemon.directory.iterdir() if not p.name.endswith("serve-lock")]
    assert sorted(files_after) == files_before


# --- integrity check at start ------------------------------------------------------------


def corrupt_with_garbage(database: Path) -> None:
    """Replace the whole file with bytes that are not SQLite at all."""
    size = database.stat().st_size
    database.write_bytes(bytes((index * 131 + 7) % 256 for index in range(size)))


def corrupt_table_page(database: Path, table: str = "identities") -> None:
    """Overwrite a table's root page, keeping a valid SQLite header."""
    with contextlib.closing(sqlite3.connect(database)) as connection:
        (root,) = connection.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)
        ).fetchone()
    data = bytearray(database.read_bytes())
    start = (root - 1) * PAGE_SIZE
    data[start : start + PAGE_SIZE] = b"\xa5" * PAGE_SIZE
    database.write_bytes(bytes(data))


def corrupt_index_entry(database: Path) -> None:
    """Flip one byte of a key hash in the table row, so the row and its index entry disagree.

    The file stays readable, and only PRAGMA integrity_check notices the damage (a row missing
    from the identities_key_hash index).
    """
    with contextlib.closing(sqlite3.connect(database)) as connection:
        root, key_hash = connection.execute(
            "SELECT (SELECT rootpage FROM sqlite_master WHERE name = 'identities'),"
            " (SELECT key_hash FROM identities LIMIT 1)"
        ).fetchone()
    data = bytearray(database.read_bytes())
    start = (root - 1) * PAGE_SIZE
    offset = data.find(key_hash, start, start + PAGE_SIZE)
    assert offset >= 0, "the key hash is not on the table's root page"
    data[offset] ^= 0xFF
    database.write_bytes(bytes(data))


def checkpointed_cache_file(database: Path) -> Path:
    """The cache file in use, with its WAL copied in, so its bytes are the whole cache."""
    (path,) = cachefile.cache_files(database)
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return path


# (file to damage, damage): the main database or the identity cache file.
CORRUPTIONS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "database not a database": ("database", corrupt_with_garbage),
    "database malformed table page": (
        "database",
        functools.partial(corrupt_table_page, table="decisions"),
    ),
    "cache not a database": ("cache", corrupt_with_garbage),
    "cache malformed table page": ("cache", corrupt_table_page),
    "cache index disagrees with table": ("cache", corrupt_index_entry),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_file_moved_aside(tmp_path: Path, kind: str) -> None:
    daemon = make_daemon(tmp_path / "corrupt")
    damaged_file, damage = CORRUPTIONS[kind]
    target = (
        daemon.database if damaged_file == "database" else checkpointed_cache_file(daemon.database)
    )
    damage(target)
    corrupted = target.read_bytes()

    try:
        daemon.start()
        scan = daemon.scan("KEY-UNKNOWN-after-corruption")
        ready = daemon.request("GET", "/readyz")
    finally:
        if daemon.process is not None:
            daemon.stop()

    moved = [
        path
        for path in daemon.directory.glob(f"{target.name}.corrupt-*")
        if not path.name.endswith(("-wal", "-shm"))
    ]
    assert len(moved) == 1, f"expected one moved-aside file, found {moved}"
    assert moved[0].read_bytes() == corrupted, "the moved-aside file is not the corrupt one"
    events = [line for line in daemon.log_lines() if line["event"] == "store.corrupt_moved_aside"]
    assert len(events) == 1, "no store.corrupt_moved_aside log line"
    assert events[0].get("moved_to") == str(moved[0])
    assert scan.status == 200
    assert ready.status == 200
    assert query_one(daemon.database, "PRAGMA integrity_check") == "ok"
    assert query_one(daemon.database, "PRAGMA user_version") == SCHEMA_VERSION
    assert count_rows(daemon.database, "identities") == 0, "the new cache is not empty"


def test_missing_cache_file_replaced_by_an_empty_one(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path / "missing")
    cachefile.remove(checkpointed_cache_file(daemon.database))

    try:
        daemon.start()
        scan = daemon.scan(SAMPLE_RECORDS[0]["key"])
    finally:
        if daemon.process is not None:
            daemon.stop()

    assert scan.status == 200
    assert scan.json()["action"] == "REJECT"
    events = [line for line in daemon.log_lines() if line["event"] == "store.cache_file_missing"]
    assert len(events) == 1, "no store.cache_file_missing log line"
    assert len(cachefile.cache_files(daemon.database)) == 1
    assert count_rows(daemon.database, "identities") == 0


def remove_cache_file(database: Path) -> None:
    cachefile.remove(checkpointed_cache_file(database))


# (file to damage, damage, text the error names) for the commands that only read
READ_ONLY_DAMAGE: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "database not a database": ("database", corrupt_with_garbage, "is damaged"),
    "cache not a database": ("cache", corrupt_with_garbage, "is damaged"),
    "cache file missing": ("database", remove_cache_file, "is missing"),
}


@pytest.mark.parametrize("kind", list(READ_ONLY_DAMAGE))
@pytest.mark.parametrize("command", ["status", "lookup"])
def test_read_only_command_leaves_damage(tmp_path: Path, command: str, kind: str) -> None:
    daemon = make_daemon(tmp_path / "damaged")
    damaged_file, damage, message = READ_ONLY_DAMAGE[kind]
    target = (
        daemon.database if damaged_file == "database" else checkpointed_cache_file(daemon.database)
    )
    damage(target)
    files_before = sorted(path.name for path in daemon.directory.iterdir())
    arguments = [SAMPLE_RECORDS[0]["key"]] if command == "lookup" else []

    result = run_cli(command, "--config", str(daemon.config), *arguments)

    assert result.returncode == 2, result.stdout
    assert message in result.stderr
    assert sorted(path.name for path in daemon.directory.iterdir()) == files_before


def point_at_folder(directory: Path) -> str:
    (directory / "state").mkdir()
    return str(directory / "state")


def point_under_a_file(directory: Path) -> str:
    (directory / "plain-file").write_text("not a folder\n", encoding="utf-8")
    return str(directory / "plain-file" / "connector.sqlite3")


# (database.path for a directory, text of the error)
UNUSABLE_PATHS: dict[str, tuple[Callable[[Path], str], str]] = {
    "a folder": (point_at_folder, "is not a file"),
    # `status` says "not found" here, `serve` and `import` "cannot open"; both name the key.
    "under a plain file": (point_under_a_file, "[database] path"),
}


@pytest.mark.parametrize("kind", list(UNUSABLE_PATHS))
@pytest.mark.parametrize("command", ["serve", "import", "status"])
def test_unusable_database_path_rejected(tmp_path: Path, command: str, kind: str) -> None:
    make_path, message = UNUSABLE_PATHS[kind]
    database = make_path(tmp_path)
    config = write_config(tmp_path, free_port())
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace(str(tmp_path / "connector.sqlite3"), database), "utf-8")
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps(SAMPLE_RECORDS[0]) + "\n", encoding="utf-8")
    files_before = sorted(path.name for path in tmp_path.rglob("*"))

    if command == "serve":
        result = run_serve_until_exit(config)
    elif command == "import":
        result = run_cli("import", "--config", str(config), str(records))
    else:
        result = run_cli("status", "--config", str(config))

    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(path.name for path in tmp_path.rglob("*")) == files_before


def test_background_check_names_the_damaged_cache_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Files above the limit are checked after READY; with the limit at 0 bytes this small
    # cache file is too. A damaged one stops the daemon, naming that file, and leaves the
    # marker that makes the next start check before serving.
    daemon = make_daemon(tmp_path / "deferred")
    cache = checkpointed_cache_file(daemon.database)
    corrupt_table_page(cache)
    monkeypatch.setattr(store_module, "SYNC_CHECK_MAX_BYTES", 0)

    with pytest.raises(StoreError) as raised:
        asyncio.run(service.serve(load_config(daemon.config)))

    assert str(raised.value) == f"identity cache file {cache} failed its integrity check"
    assert check_marker(daemon.database).exists()


def test_background_check_can_be_interrupted(tmp_path: Path) -> None:
    # A stop must not wait for the check of a large cache. Interrupting it raises
    # CheckInterrupted, which marks the file neither healthy nor corrupt.
    path = tmp_path / "large.sqlite3"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE filler (id INTEGER PRIMARY KEY, data BLOB)")
    connection.executemany(
        "INSERT INTO filler (data) VALUES (randomblob(500))", ([] for _ in range(200_000))
    )
    connection.commit()
    connection.close()
    opened = threading.Event()
    checks: list[sqlite3.Connection] = []

    def remember(check: sqlite3.Connection) -> None:
        checks.append(check)
        opened.set()

    def interrupt_soon() -> None:
        opened.wait(10)
        # Keep interrupting until the check ends: an interrupt before the statement starts
        # is lost.
        while thread.is_alive():
            checks[0].interrupt()
            thread.join(0.005)

    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(check_integrity(path, 5.0, True, remember))
        except CheckInterrupted as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    interrupt_soon()
    assert isinstance(outcome[0], CheckInterrupted)


# --- pragmas -----------------------------------------------------------------------------


def test_journal_mode_is_wal(daemon: Daemon) -> None:
    assert query_one(daemon.database, "PRAGMA journal_mode") == "wal"
    assert query_one(daemon.database, "PRAGMA cache.journal_mode") == "wal"


# --- the HMAC secret ---------------------------------------------------------------------


def create_by_import(daemon: Daemon) -> None:
    records = write_records(daemon.directory / "records.jsonl", SAMPLE_RECORDS)
    result = run_cli("import", "--config", str(daemon.config), str(records))
    assert result.returncode == 0, result.stderr


def create_by_serve(daemon: Daemon) -> None:
    try:
        daemon.start()
    finally:
        if daemon.process is not None:
            daemon.stop()


@pytest.mark.parametrize("creator", [create_by_import, create_by_serve], ids=["import", "serve"])
def test_secret_created_mode_0600(tmp_path: Path, creator: Callable[[Daemon], None]) -> None:
    daemon = new_daemon(tmp_path / "fresh")

    creator(daemon)

    secret = secret_path(daemon.database)
    assert secret.is_file(), f"{secret} was not created beside the database"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def populate_identities(directory: Path) -> Daemon:
    return make_daemon(directory)


def populate_decisions_only(directory: Path) -> Daemon:
    """A database with decisions and outbox events (hashed with the secret) but no identities."""
    daemon = make_daemon(directory, records=[])
    try:
        daemon.start()
        for number in range(3):
            assert daemon.scan(f"UNKNOWN-DECIDED-{number}").status == 200
    finally:
        if daemon.process is not None:
            daemon.stop()
    return daemon


@pytest.mark.parametrize("command", ["serve", "import"])
@pytest.mark.parametrize(
    "populate", [populate_identities, populate_decisions_only], ids=["identities", "decisions"]
)
def test_missing_secret_rejected(
    tmp_path: Path, populate: Callable[[Path], Daemon], command: str
) -> None:
    daemon = populate(tmp_path / "populated")
    secret = secret_path(daemon.database)
    secret.unlink()

    result = COMMANDS[command](daemon)

    assert result.returncode == 2, result.stderr
    assert str(secret) in result.stderr
    assert not secret.exists(), "a new secret was made for a database hashed with the old one"


def secret_forms(database: Path) -> list[str]:
    text = secret_path(database).read_text(encoding="ascii").strip()
    raw = bytes.fromhex(text)
    return [text.lower(), text.upper(), base64.b64encode(raw).decode(), raw.hex()[:32]]


def test_secret_never_logged(daemon: Daemon) -> None:
    for record in SAMPLE_RECORDS[:4]:
        assert daemon.scan(record["key"]).status == 200
    assert daemon.scan("KEY-NEVER-IMPORTED-1a2b3c").status == 200
    config = str(daemon.config)
    outputs = {
        "import": run_cli("import", "--config", config, str(daemon.directory / "records.jsonl")),
        "lookup": run_cli("lookup", "--config", config, SAMPLE_RECORDS[0]["key"]),
        "status": run_cli("status", "--config", config, "--json"),
    }
    daemon.stop()

    texts = {"daemon log": daemon.log_path.read_text(encoding="utf-8")}
    for name, result in outputs.items():
        texts[f"{name} output"] = result.stdout + result.stderr
    for form in secret_forms(daemon.database):
        for name, text in texts.items():
            assert form not in text, f"the HMAC secret appears in the {name}"


# --- no raw scanned value at rest or in logs -----------------------------------------------


def scanned_values() -> list[tuple[str, str, list[str]]]:
    """(value as sent, channel, the strings that must not be found) for each scan.

    Every value is distinct, so a hit points at one scan. Known keys are sent raw, with a
    scanner's CR/LF suffix, base64-encoded, and as a card UID in another spelling.
    """
    tag = uuid.uuid4().hex[:12]
    shopper = SAMPLE_RECORDS[0]["key"]
    associate = SAMPLE_RECORDS[1]["key"]
    cash = SAMPLE_RECORDS[2]["key"]
    encoded = base64.b64encode(cash.encode()).decode()
    return [
        (f"UNKNOWN-RAW-{tag}-1", "OPTICAL", [f"UNKNOWN-RAW-{tag}-1"]),
        (f"  UNKNOWN-RAW-{tag}-2\r\n", "OPTICAL", [f"UNKNOWN-RAW-{tag}-2"]),
        (f"unknown raw {tag} with spaces", "OPTICAL", [f"unknown raw {tag} with spaces"]),
        (f"UNKNOWN-ÜNICODE-{tag}-ß", "OPTICAL", [f"UNKNOWN-ÜNICODE-{tag}-ß"]),
        (shopper, "OPTICAL", [shopper]),
        (associate + "\r\n", "OPTICAL", [associate]),
        (encoded, "OPTICAL", [encoded, cash]),
        ("04A23B1C5D6E80", "RADIO", ["04A23B1C5D6E80", "04:a2:3b:1c:5d:6e:80"]),
    ]


def find_values(data: bytes, needles: list[str]) -> list[str]:
    return [needle for needle in needles if needle.encode("utf-8") in data]


def database_files(database: Path) -> dict[str, bytes]:
    """The database, its cache file, and their WAL and shared-memory files, by name."""
    files = {}
    for base in (database, *cachefile.cache_files(database)):
        for suffix in ("", "-wal", "-shm"):
            path = Path(str(base) + suffix)
            if path.exists():
                files[path.name] = path.read_bytes()
    return files


def test_no_raw_value_stored_or_logged(daemon: Daemon) -> None:
    scans = scanned_values()
    needles = [needle for _value, _channel, forms in scans for needle in forms]
    for value, channel, _forms in scans:
        assert daemon.scan(value, channel=channel).status == 200
    too_long = f"TOO-LONG-{uuid.uuid4().hex}-" + "x" * 1000
    assert daemon.scan(too_long).status == 400
    needles.append(too_long[:40])
    lookup = run_cli("lookup", "--config", str(daemon.config), f"UNKNOWN-LOOKUP-{uuid.uuid4()}")

    running = database_files(daemon.database)
    daemon.stop()
    stopped = database_files(daemon.database)

    assert f"{daemon.database.name}-wal" in running, "no WAL file to inspect while running"
    for phase, files in (("running", running), ("stopped", stopped)):
        for name, data in files.items():
            assert find_values(data, needles) == [], f"raw values in {name} while {phase}"
    log = daemon.log_path.read_bytes()
    assert find_values(log, needles) == [], "raw values in the daemon log"
    assert count_rows(daemon.database, "decisions") == len(scans)
    assert "UNKNOWN-LOOKUP-" not in lookup.stderr, "raw value in the log of `lookup`"


def test_second_daemon_on_database_refused(daemon: Daemon, tmp_path: Path) -> None:
    second = tmp_path / "second.toml"
    second.write_text(
        daemon.config.read_text(encoding="utf-8").replace(
            f"port = {daemon.port}", f"port = {free_port()}"
        ),
        encoding="utf-8",
    )

    result = run_serve_until_exit(second)

    assert result.returncode == 2, result.stderr
    assert "another daemon is serving database" in result.stderr
    assert daemon.scan(SAMPLE_RECORDS[0]["key"]).status == 200
