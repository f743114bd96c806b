"""Run the ResolveScan benchmarks in one go and write a results table and a latency plot.

One wrk (with resolve.lua) drives every target on this machine: the aiohttp floor
(tests/bench/floor_app.py) and the daemon with each cache size. Each target gets a run of one
connection back to back, a run of 16 connections paced to --rate requests/s in total and a
run of 16 connections back to back (saturation). For each cache size the script also times
the import and reads the daemon's resident memory after the runs. Cold start to READY is
measured on the largest database, and tests/bench/bench_sync.py runs as a subprocess for the
snapshot apply figures. The Markdown goes to stdout and to <workdir>/results.md, the raw
figures to <workdir>/results.json, and a PNG of the latency percentiles to --plot (needs
matplotlib).

    .venv/bin/python tests/bench/bench_all.py --identities 1000000 10000000 --duration 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from daemon import cachefile  # noqa: E402
from daemon.store import SYNC_CHECK_MAX_BYTES  # noqa: E402
from tests.bench.bench_resolve import (  # noqa: E402
    CONNECTIONS,
    WARM_UP_SECONDS,
    cpu_model,
    generate_records,
    import_records,
    measure_wrk_runs,
    start_daemon,
    stop_process,
    wait_healthy,
    write_config,
)
from tests.bench.bench_startup import start_once  # noqa: E402
from tests.bench.bench_sync import machine_load  # noqa: E402
from tests.conftest import free_port  # noqa: E402

COLD_START_RUNS = 5
# An estimate with a wide margin: quick_check of a 218 MB database (1,000,000 identities)
# took about 8 s on the 2-core machine of docs/benchmarks.md, so ten times that is minutes.
INTEGRITY_TIMEOUT = 1200.0
# Seconds bench_sync.py gets after SIGINT to stop its daemon and fake HQ in its finally
# blocks, before its process group is killed.
SYNC_STOP_TIMEOUT = 120.0

# Targets the results are checked against. MB are 10**6 bytes.
P50_RATIO_MAX = 1.3
P99_RATIO_MAX = 1.5
SATURATION_MIN_DECISIONS = 3000
APPLY_P99_RATIO_MAX = 2.0
RSS_MAX_BYTES = 150 * 10**6
COLD_START_MAX_SECONDS = 1.0

PERCENTILES = (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9"))


@dataclass
class TargetRun:
    """wrk figures of one target (the floor, or the daemon with one cache size)."""

    name: str
    single: dict[str, Any]
    paced: dict[str, Any]
    saturated: dict[str, Any]
    identities: int | None = None
    import_seconds: float | None = None
    database_bytes: int | None = None
    memory: dict[str, int] = field(default_factory=dict)


@dataclass
class SyncRun:
    """What bench_sync.py printed, and the figures parsed from it (None when not found)."""

    command: str
    returncode: int
    output: str
    apply_rate: float | None = None
    idle_p99_ms: float | None = None
    apply_p99_ms: float | None = None


def progress(message: str) -> None:
    """Print a progress line to stderr, so stdout carries only the Markdown."""
    stamp = datetime.now(UTC).strftime("%H:%M:%S")
    print(f"[bench_all {stamp}] {message}", file=sys.stderr, flush=True)


def display_path(path: Path) -> str:
    """Return ``path`` relative to the repository when it is inside it, for commands to copy."""
    try:
        return str(path.absolute().relative_to(REPO))
    except ValueError:
        return str(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    parser.add_argument(
        "--identities",
        type=int,
        nargs="+",
        default=[1_000_000, 10_000_000],
        help="cache sizes to measure the daemon with; cold start uses the largest",
    )
    parser.add_argument("--duration", type=int, default=20, help="seconds per wrk run")
    parser.add_argument(
        "--rate",
        type=int,
        default=200,
        help=f"requests/s in total of the paced run over {CONNECTIONS} connections",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/identity-connector-bench"),
        help="folder for the JSON Lines files (kept and reused), databases, logs and results",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=REPO / "docs" / "benchmark-latency.png",
        help="PNG file for the latency plot",
    )

    parser.add_argument(
        "--sync-identities",
        type=int,
        default=1_000_000,
        help="snapshot size passed to bench_sync.py --identities",
    )
    parser.add_argument(
        "--sync-events",
        type=int,
        default=100_000,
        help="outbox events passed to bench_sync.py --events",
    )
    parser.add_argument(
        "--skip-sync",
        action="store_true",
        help="skip bench_sync.py (snapshot apply rate and ResolveScan during the apply)",
    )

    args = parser.parse_args(argv)
    if any(count <= 0 for count in args.identities):
        parser.error("--identities: every count must be a positive integer")
    args.identities = sorted(set(args.identities))
    return args


def wait_for_log_event(
    log_path: Path, name: str, process: subprocess.Popen, timeout: float
) -> None:
    """Wait until the JSON log contains event ``name``.

    Raises RuntimeError when ``process`` exits first or after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    offset = 0
    pending = b""
    while time.monotonic() < deadline:
        with log_path.open("rb") as log:
            log.seek(offset)
            chunk = log.read()
        offset += len(chunk)
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict) and event.get("event") == name:
                return
        if process.poll() is not None:
            raise RuntimeError(
                f"daemon exited with status {process.returncode} before logging {name};"
                f" see {log_path}"
            )
        time.sleep(0.5)
    raise RuntimeError(f"no {name} in {log_path} after {timeout:.0f} s")


def read_memory(pid: int) -> dict[str, int]:
    """Return VmRSS, RssAnon, RssFile, RssShmem and VmHWM of ``pid`` in bytes."""
    fields = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")
    memory = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            # The kernel writes these in kB, which are KiB.
            memory[name] = int(value.split()[0]) * 1024
    return memory


def measure_floor(args: argparse.Namespace, commands: list[str]) -> TargetRun:
    port = free_port()
    script = HERE / "floor_app.py"
    command = [sys.executable, str(script), str(port)]
    commands.append(
        shlex.join([display_path(Path(sys.executable)), display_path(script), str(port)])
    )
    with (args.workdir / "floor.log").open("wb") as log:
        floor = subprocess.Popen(command, stdout=log, stderr=log, cwd=REPO)
    try:
        wait_healthy(port)
        # The floor ignores the key, so any identity count gives it the same bodies.
        single, paced, saturated = measure_wrk_runs(
            port, max(args.identities), args.duration, args.rate
        )
    finally:
        stop_process(floor)
    return TargetRun(name="aiohttp floor", single=single, paced=paced, saturated=saturated)


def measure_daemon(
    args: argparse.Namespace, identities: int, commands: list[str]
) -> tuple[TargetRun, Path]:
    """Import ``identities`` records into a new database, run wrk against `serve`, stop it."""
    records = args.workdir / f"identities-{identities}.jsonl"
    if not records.exists():
        progress(f"generating {records}")
    generate_records(records, identities)

    run_dir = args.workdir / f"all-run-{identities}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    port = free_port()
    config = write_config(run_dir, port)
    database = run_dir / "connector.sqlite3"

    progress(f"importing {identities:,} identities")
    python = display_path(Path(sys.executable))
    commands.append(
        shlex.join([python, "-m", "daemon", "import", "--config", str(config), str(records)])
    )
    import_seconds, summary = import_records(config, records)
    progress(f"import took {import_seconds:.1f} s: {summary}")
    # The identities are in the cache file beside the database, which has little else yet.
    database_bytes = sum(
        path.stat().st_size for path in (database, *cachefile.cache_files(database))
    )

    log_path = run_dir / "daemon.log"
    commands.append(shlex.join([python, "-m", "daemon", "serve", "--config", str(config)]))
    daemon = start_daemon(config, log_path)
    try:
        wait_healthy(port)
        if database_bytes > SYNC_CHECK_MAX_BYTES:
            # The daemon checks a database this large in a thread after READY, and that read
            # competes with the requests, so the runs start after it logs the result.
            progress(f"waiting for the integrity check of {database_bytes / 1e6:,.0f} MB")
            wait_for_log_event(log_path, "store.integrity_ok", daemon, INTEGRITY_TIMEOUT)
        progress(f"wrk against the daemon with {identities:,} identities")
        single, paced, saturated = measure_wrk_runs(port, identities, args.duration, args.rate)
        if daemon.poll() is not None:
            raise RuntimeError(
                f"daemon exited with status {daemon.returncode} during the wrk runs; see {log_path}"
            )
        memory = read_memory(daemon.pid)
    finally:
        stop_process(daemon)

    run = TargetRun(
        name=f"daemon, {identities:,} identities",
        single=single,
        paced=paced,
        saturated=saturated,
        identities=identities,
        import_seconds=import_seconds,
        database_bytes=database_bytes,
        memory=memory,
    )
    return run, config


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Return each Markdown table in ``text`` as rows keyed by the header cells."""
    tables: list[list[dict[str, str]]] = []
    header: list[str] | None = None
    rows: list[dict[str, str]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not (stripped.startswith("|") and stripped.endswith("|")):
            if header is not None:
                tables.append(rows)
            header, rows = None, []
            continue
        cells = [cell.strip() for cell in stripped[1:-1].split("|")]
        if header is None:
            header = cells
        elif not set("".join(cells)) <= set("-: "):
            rows.append(dict(zip(header, cells, strict=False)))
    if header is not None:
        tables.append(rows)
    return tables


def parse_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def parse_sync_output(run: SyncRun) -> None:
    """Fill the apply rate and the idle and during-apply p99 from bench_sync.py's tables.

    The apply rate is the first rebuild's (empty database, no ResolveScan load). A table or
    row that is not found leaves its figure None.
    """
    for rows in markdown_tables(run.output):
        if not rows:
            continue
        label_column = next(iter(rows[0]))
        if "records/s" in rows[0] and run.apply_rate is None:
            first = next((r for r in rows if r[label_column].startswith("first")), rows[0])
            run.apply_rate = parse_number(first["records/s"])
        if "p99 (ms)" in rows[0]:
            for row in rows:
                label = row[label_column].lower()
                if label == "idle":
                    run.idle_p99_ms = parse_number(row["p99 (ms)"])
                elif label.startswith("during"):
                    run.apply_p99_ms = parse_number(row["p99 (ms)"])


def run_sync_benchmark(args: argparse.Namespace) -> SyncRun:
    script = HERE / "bench_sync.py"
    command = [
        sys.executable,
        str(script),
        "--identities",
        str(args.sync_identities),
        "--events",
        str(args.sync_events),
        "--workdir",
        str(args.workdir),
    ]
    display_command = shlex.join(
        [display_path(Path(sys.executable)), display_path(script), *command[2:]]
    )
    stderr_path = args.workdir / "bench_sync.stderr"
    with stderr_path.open("wb") as stderr:
        # A session of its own, so Ctrl-C reaches it only through the finally block below,
        # which sends SIGINT and lets its own finally blocks stop its daemon and fake HQ.
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=REPO,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = process.communicate()
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=SYNC_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
    run = SyncRun(command=display_command, returncode=process.returncode, output=output)
    if process.returncode != 0:
        tail = stderr_path.read_text(encoding="utf-8", errors="replace").strip()[-2000:]
        run.output += f"\n\nbench_sync.py exited with status {process.returncode}:\n\n{tail}\n"
        progress(f"bench_sync.py failed with exit status {process.returncode}; see {stderr_path}")
    parse_sync_output(run)
    return run


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe_machine() -> tuple[str, str]:
    """Return a short description (cores, CPU, memory) and a full one with the software."""
    memory_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    os_name = platform.system()
    os_release = Path("/etc/os-release")
    if os_release.exists():
        for line in os_release.read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    # wrk -v prints its version line and then the usage text, with exit status 1.
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("[")[0]
    short = f"{os.cpu_count()} cores, {cpu_model()}, {memory_kib / 2**20:.1f} GiB RAM"
    return short, (
        f"{short}, {os_name} (kernel {platform.release()}), Python {platform.python_version()},"
        f" SQLite {sqlite3.sqlite_version}, aiohttp {package_version('aiohttp')},"
        f" uvloop {package_version('uvloop')}, msgspec {package_version('msgspec')};"
        f" load generator {wrk.strip()} on the same machine"
    )


def verdict(met: bool | None) -> str:
    if met is None:
        return "not measured"
    return "yes" if met else "no"


def latency_table(floor: TargetRun, daemons: list[TargetRun], rate: int) -> list[str]:
    lines = [
        "| target | load | p50 (ms) | p99 (ms) | p99.9 (ms) | requests/s | errors"
        " | p50 / floor | p99 / floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in (floor, *daemons):
        for load, figures, floor_figures in (
            ("1 connection, back to back", run.single, floor.single),
            (f"{CONNECTIONS} connections paced to {rate}/s", run.paced, floor.paced),
            (f"{CONNECTIONS} connections, saturation", run.saturated, floor.saturated),
        ):
            if run is floor:
                ratios = "– | –"
            else:
                ratios = (
                    f"{figures['p50_ms'] / floor_figures['p50_ms']:.2f}x"
                    f" | {figures['p99_ms'] / floor_figures['p99_ms']:.2f}x"
                )
            lines.append(
                f"| {run.name} | {load} | {figures['p50_ms']:.2f} | {figures['p99_ms']:.2f}"
                f" | {figures['p999_ms']:.2f} | {figures['rps']:,.0f} | {figures['errors']}"
                f" | {ratios} |"
            )
    return lines


def other_figures_table(
    daemons: list[TargetRun], sync: SyncRun | None, cold_starts: list[float]
) -> list[str]:
    lines = ["| measure | value |", "|---|---|"]
    for run in daemons:
        assert run.identities is not None and run.import_seconds is not None
        lines.append(
            f"| import of {run.identities:,} identities into an empty database"
            f" | {run.import_seconds:.1f} s, {run.identities / run.import_seconds:,.0f} records/s"
            f" ({run.database_bytes / 1e6:,.0f} MB, database and cache file) |"
        )
    if sync is None:
        lines.append("| snapshot apply, ResolveScan during apply | not run (--skip-sync) |")
    else:
        rate = "not found" if sync.apply_rate is None else f"{sync.apply_rate:,.0f} records/s"
        lines.append(f"| snapshot apply, first rebuild (bench_sync.py) | {rate} |")
        if sync.idle_p99_ms is None or sync.apply_p99_ms is None:
            lines.append("| ResolveScan p99 during apply against idle | not found |")
        else:
            lines.append(
                f"| ResolveScan p99 during apply against idle | {sync.apply_p99_ms:.2f} ms"
                f" against {sync.idle_p99_ms:.2f} ms"
                f" ({sync.apply_p99_ms / sync.idle_p99_ms:.2f}x) |"
            )
    largest = daemons[-1]
    memory = largest.memory
    lines.append(
        f"| resident memory with {largest.identities:,} identities, after the wrk runs"
        f" | VmRSS {memory['VmRSS'] / 1e6:.0f} MB (RssAnon {memory['RssAnon'] / 1e6:.0f} MB,"
        f" RssFile {memory['RssFile'] / 1e6:.0f} MB, RssShmem {memory['RssShmem'] / 1e6:.0f} MB);"
        f" peak VmHWM {memory['VmHWM'] / 1e6:.0f} MB |"
    )
    lines.append(
        f"| cold start to READY with {largest.identities:,} identities"
        f" | median {statistics.median(cold_starts):.3f} s, max {max(cold_starts):.3f} s"
        f" over {len(cold_starts)} runs |"
    )
    return lines


def target_rows(
    floor: TargetRun,
    daemons: list[TargetRun],
    sync: SyncRun | None,
    cold_starts: list[float],
    rate: int,
) -> list[tuple[str, str, bool | None]]:
    """Return (target, measured value, met) for each target."""
    rows: list[tuple[str, str, bool | None]] = []
    for run in daemons:
        p50_ratio = run.paced["p50_ms"] / floor.paced["p50_ms"]
        p99_ratio = run.paced["p99_ms"] / floor.paced["p99_ms"]
        decisions = run.saturated["success_rps"]
        rows += [
            (
                f"{run.name}: p50 at {rate}/s within {P50_RATIO_MAX}x of the floor",
                f"{p50_ratio:.2f}x",
                p50_ratio <= P50_RATIO_MAX,
            ),
            (
                f"{run.name}: p99 at {rate}/s within {P99_RATIO_MAX}x of the floor",
                f"{p99_ratio:.2f}x",
                p99_ratio <= P99_RATIO_MAX,
            ),
            (
                f"{run.name}: at least {SATURATION_MIN_DECISIONS:,} decisions/s at saturation",
                f"{decisions:,.0f} decisions/s",
                decisions >= SATURATION_MIN_DECISIONS,
            ),
        ]

    if sync is None or sync.idle_p99_ms is None or sync.apply_p99_ms is None:
        rows.append((f"p99 during snapshot apply within {APPLY_P99_RATIO_MAX}x of idle", "–", None))
    else:
        apply_ratio = sync.apply_p99_ms / sync.idle_p99_ms
        rows.append(
            (
                f"p99 during snapshot apply within {APPLY_P99_RATIO_MAX}x of idle",
                f"{apply_ratio:.2f}x",
                apply_ratio <= APPLY_P99_RATIO_MAX,
            )
        )

    largest = daemons[-1]
    rss = largest.memory["VmRSS"]
    median_start = statistics.median(cold_starts)
    rows += [
        (
            f"VmRSS with {largest.identities:,} identities under {RSS_MAX_BYTES / 1e6:.0f} MB",
            f"{rss / 1e6:.0f} MB",
            rss < RSS_MAX_BYTES,
        ),
        (
            f"cold start to READY under {COLD_START_MAX_SECONDS:.0f} s (median)",
            f"{median_start:.3f} s",
            median_start < COLD_START_MAX_SECONDS,
        ),
    ]
    return rows


def render_markdown(
    args: argparse.Namespace,
    started: datetime,
    machine: str,
    loads: dict[str, str],
    commands: list[str],
    floor: TargetRun,
    daemons: list[TargetRun],
    sync: SyncRun | None,
    cold_starts: list[float],
    plot_note: str,
) -> str:
    lines = [
        f"# ResolveScan benchmarks, {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"**Machine:** {machine}.",
        "",
        "## Latency and throughput",
        "",
        f"wrk with `tests/bench/resolve.lua`, {args.duration} s per run after a"
        f" {WARM_UP_SECONDS} s warm-up. Every request has a new `scanEvent.id`, and one key in"
        " ten is unknown. In the paced run each connection waits an exponentially distributed"
        " time after each response before its next request, so the rate reached differs a"
        " little from the nominal one. wrk's errors include responses with a status above 399, and"
        " decisions/s counts the other responses.",
        "",
        *latency_table(floor, daemons, args.rate),
        "",
        "## Import, snapshot apply, memory, cold start",
        "",
        *other_figures_table(daemons, sync, cold_starts),
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for target, measured, met in target_rows(floor, daemons, sync, cold_starts, args.rate):
        lines.append(f"| {target} | {measured} | {verdict(met)} |")
    lines += ["", plot_note, "", "## Load before each phase", ""]
    lines += [f"- {phase}: {load}" for phase, load in loads.items()]
    lines += ["", "## Commands", "", "```sh", *commands]
    for run in (floor, *daemons):
        lines += [
            f"# {run.name}",
            run.single["command"],
            run.paced["command"],
            run.saturated["command"],
        ]
    lines += ["```", ""]
    lines.append(
        f"Cold start: `tests/bench/bench_startup.py`'s `start_once` {COLD_START_RUNS} times on"
        f" the {daemons[-1].identities:,}-identity configuration above, from process start"
        " to the READY=1 datagram on NOTIFY_SOCKET. The database files are in the page cache"
        " from the runs before it."
    )
    if sync is not None:
        lines += ["", "## bench_sync.py output", "", f"`{sync.command}`", ""]
        # Its headings move one level down to sit under this section.
        for line in sync.output.strip().splitlines():
            lines.append("#" + line if line.startswith("#") else line)
    return "\n".join(lines) + "\n"


def plot_latency(
    floor: TargetRun, daemons: list[TargetRun], rate: int, path: Path, title: str
) -> None:
    """Draw p50, p99 and p99.9 of every target and load as grouped bars on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = []
    for run in (floor, *daemons):
        groups.append((f"{run.name}\n1 connection", run.single))
        groups.append((f"{run.name}\npaced to {rate}/s", run.paced))
        groups.append((f"{run.name}\nsaturation", run.saturated))

    figure, axes = plt.subplots(figsize=(max(8.0, 1.9 * len(groups)), 5.5))
    width = 0.8 / len(PERCENTILES)
    for index, (key, label) in enumerate(PERCENTILES):
        positions = [group + (index - 1) * width for group in range(len(groups))]
        # A log axis cannot show 0. wrk reports whole microseconds, so 1 us is the smallest.
        values = [max(figures[key], 0.001) for _, figures in groups]
        bars = axes.bar(positions, values, width, label=label)
        axes.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    axes.set_yscale("log")
    axes.set_xticks(range(len(groups)), [name for name, _ in groups], fontsize=8)
    axes.set_ylabel("latency (ms, log scale)")
    axes.set_title(title, fontsize=10)
    axes.grid(axis="y", which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # SystemExit unwinds through the finally blocks that stop the daemon, floor and wrk.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("error: wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    args.workdir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    machine_short, machine = describe_machine()
    harness = [display_path(Path(sys.executable)), display_path(Path(__file__))]
    commands = [shlex.join([*harness, *(sys.argv[1:] if argv is None else argv)])]
    loads: dict[str, str] = {}

    loads["floor"] = machine_load()
    progress("wrk against the aiohttp floor")
    floor = measure_floor(args, commands)

    daemons = []
    config = None
    for identities in args.identities:
        loads[f"import of {identities:,} identities"] = machine_load()
        run, config = measure_daemon(args, identities, commands)
        daemons.append(run)

    assert config is not None
    loads["cold start"] = machine_load()
    progress(f"cold start to READY, {COLD_START_RUNS} runs")
    # A new port, because the one picked before the imports may have been taken since.
    write_config(config.parent, free_port())
    cold_start_log = config.parent / "cold-start.log"
    cold_starts = [start_once(config, cold_start_log) for _ in range(COLD_START_RUNS)]

    sync = None
    if not args.skip_sync:
        loads["bench_sync.py"] = machine_load()
        progress("running bench_sync.py")
        sync = run_sync_benchmark(args)

    title = (
        "ResolveScan latency by target and load (wrk)\n"
        f"{machine_short}, {started:%Y-%m-%d %H:%M} UTC"
    )
    try:
        plot_latency(floor, daemons, args.rate, args.plot, title)
        plot_note = f"Latency plot: `{display_path(args.plot)}`."
    except ImportError:
        plot_note = "No latency plot: matplotlib is not installed (pip install matplotlib)."
        progress(plot_note)

    markdown = render_markdown(
        args, started, machine, loads, commands, floor, daemons, sync, cold_starts, plot_note
    )
    print(markdown, end="")
    (args.workdir / "results.md").write_text(markdown, encoding="utf-8")
    raw = {
        "started": started.isoformat(),
        "machine": machine,
        "floor": asdict(floor),
        "daemons": [asdict(run) for run in daemons],
        "cold_start_seconds": cold_starts,
        "sync": None if sync is None else asdict(sync),
    }
    (args.workdir / "results.json").write_text(json.dumps(raw, indent=2), encoding="utf-8")
    progress(f"wrote {args.workdir / 'results.md'} and {args.workdir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
