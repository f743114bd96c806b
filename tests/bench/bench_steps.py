"""Time each step of a ResolveScan decision in one process, on real SQLite files.

The socket benchmarks (bench_resolve.py, bench_all.py) give the daemon's latency beside the
aiohttp floor. This script shows where the difference goes. It imports N identities and opens
the store as `serve` does. Then it runs the daemon's own code for each step of a decision, one
decision at a time, with the JSON log going to a file. Each step runs ROUNDS rounds of
--decisions decisions, and the table gives the median round in microseconds per decision.
Prints Markdown.

    .venv/bin/python tests/bench/bench_steps.py --identities 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
import uvloop

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from daemon.config import load_config  # noqa: E402
from daemon.logs import configure_logging  # noqa: E402
from daemon.metrics import Metrics  # noqa: E402
from daemon.resolver import Resolver, audit_event, decision_rows  # noqa: E402
from daemon.schema import ResolveScanRequest, decode_request  # noqa: E402
from daemon.store import Rows, Store, connect  # noqa: E402
from tests.bench.bench_resolve import (  # noqa: E402
    cpu_model,
    generate_records,
    import_records,
    write_config,
)

ROUNDS = 5
# Decisions before the timed rounds, so the reader's and the writer's page caches hold what
# a running daemon's would.
WARM_UP_DECISIONS = 2000

log = structlog.get_logger("bench_steps")


def request_body(index: int, identities: int) -> bytes:
    """Return a ResolveScan body like resolve.lua's: a new scanEvent.id, one key in ten unknown."""
    key = f"UNKNOWN-{index}" if index % 10 == 0 else f"BENCH-KEY-{index * 7919 % identities:08d}"
    timestamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return (
        f'{{"requestId":"{uuid.uuid4()}","storeId":"STORE-001","scanEvent":{{'
        f'"id":"{uuid.uuid4()}","timestamp":"{timestamp}","location":"ENTRY",'
        f'"value":"{key}","channel":"OPTICAL"}}}}'
    ).encode()


class Steps:
    """The steps of one decision, each a function of one decoded request."""

    def __init__(self, store: Store, resolver: Resolver, database: Path) -> None:
        self.store = store
        self.resolver = resolver
        # A connection of this thread, to time a commit without the hand-off to the writer.
        self.direct = connect(database, busy_timeout=5.0)
        self.direct.execute("ATTACH DATABASE ? AS cache", (str(store.cache.path),))

    def evaluate(self, request: ResolveScanRequest) -> object:
        scan = request.scanEvent
        return self.resolver.evaluate(
            scan.value, request.storeId, scan.location, scan.channel, scan.timestamp.timestamp()
        )

    def rows(self, request: ResolveScanRequest) -> Rows:
        return self.audit_rows((request, self.evaluate(request)))

    def audit_rows(self, item: tuple[ResolveScanRequest, object]) -> Rows:
        request, evaluation = item
        scan = request.scanEvent
        event = audit_event(
            source="gateway",
            store_id=request.storeId,
            request_id=request.requestId,
            scan_event_id=scan.id,
            scanned_at=scan.timestamp,
            location=scan.location,
            channel=scan.channel,
            evaluation=evaluation,  # type: ignore[arg-type]
            latency_ms=0.5,
            now=time.time(),
        )
        request_hash = self.store.hasher.hash_parts(
            request.storeId, scan.location, scan.channel, scan.value
        )
        return decision_rows(
            scan.id.lower(),
            request_hash,
            b'{"id":"x","type":"SHOPPER","action":"ACCEPT"}',
            evaluation.verdict,  # type: ignore[attr-defined]
            event,
            time.time(),
        )

    def log_line(self, request: ResolveScanRequest) -> None:
        scan = request.scanEvent
        log.info(
            "scan.decided",
            request_id=request.requestId,
            scan_event_id=scan.id,
            store_id=request.storeId,
            location=scan.location,
            channel=scan.channel,
            key_fingerprint="0123456789ab",
            identity_id="person-00000001",
            type="SHOPPER",
            action="ACCEPT",
            reason="ACCEPTED",
            overridden=None,
            latency_ms=0.5,
        )

    def commit_here(self, job: Rows) -> None:
        self.direct.execute("BEGIN IMMEDIATE")
        job(self.direct)
        self.direct.execute("COMMIT")


async def time_rounds(
    name: str,
    count: int,
    make_inputs: Callable[[int], list],
    step: Callable[[object], object],
    before: Callable[[], Awaitable[object]] | None = None,
) -> tuple[str, float]:
    """Return the median over ROUNDS of the microseconds per call of ``step``.

    ``before``, when given, is awaited ahead of each call and left out of the time.
    """
    per_call = []
    for round_number in range(ROUNDS):
        inputs = make_inputs(round_number)
        spent = 0.0
        for item in inputs:
            if before is not None:
                await before()
            started = time.perf_counter()
            result = step(item)
            if isinstance(result, Awaitable):
                await result
            spent += time.perf_counter() - started
        per_call.append(spent / count * 1e6)
    return name, statistics.median(per_call)


async def measure(store: Store, resolver: Resolver, database: Path, args: argparse.Namespace):
    steps = Steps(store, resolver, database)
    count = args.decisions
    serial = iter(range(WARM_UP_DECISIONS + 10 * ROUNDS * count * 10))

    def next_body() -> bytes:
        return request_body(next(serial), args.identities)

    def bodies(_round: int) -> list[bytes]:
        return [next_body() for _ in range(count)]

    def requests(_round: int) -> list[ResolveScanRequest]:
        return [decode_request(body) for body in bodies(_round)]

    def jobs(_round: int) -> list[Rows]:
        return [steps.rows(request) for request in requests(_round)]

    def evaluated(_round: int) -> list[tuple[ResolveScanRequest, object]]:
        return [(request, steps.evaluate(request)) for request in requests(_round)]

    for body in bodies(0)[:WARM_UP_DECISIONS]:
        await resolver.resolve(decode_request(body), time.perf_counter())

    hasher = store.hasher
    metrics = resolver.metrics
    assert metrics is not None
    empty = Rows(())
    results = [
        await time_rounds("decode and validate the body (msgspec)", count, bodies, decode_request),
        await time_rounds(
            "request hash (HMAC-SHA-256)",
            count,
            requests,
            lambda r: hasher.hash_parts(
                r.storeId, r.scanEvent.location, r.scanEvent.channel, r.scanEvent.value
            ),
        ),
        await time_rounds(
            "idempotency lookup, a miss (reader)",
            count,
            requests,
            lambda r: store.reader.decision(r.scanEvent.id.lower()),
        ),
        await time_rounds(
            "evaluate: normalise, HMAC, identity lookup, policy",
            count,
            requests,
            steps.evaluate,
        ),
        await time_rounds(
            "evaluate, right after 1 ms of sleep",
            count,
            requests,
            steps.evaluate,
            before=lambda: asyncio.sleep(0.001),
        ),
        await time_rounds(
            "evaluate, right after a round trip to the writer thread",
            count,
            requests,
            steps.evaluate,
            before=lambda: store.writer.submit(empty),
        ),
        await time_rounds(
            "idempotency lookup, right after a commit of the writer",
            count,
            requests,
            lambda r: store.reader.decision(r.scanEvent.id.lower()),
            before=lambda: store.writer.submit(steps.rows(decode_request(next_body()))),
        ),
        await time_rounds("audit event and its rows", count, evaluated, steps.audit_rows),
        await time_rounds(
            "scan.decided log line (JSON to a file)", count, requests, steps.log_line
        ),
        await time_rounds(
            "metrics: decision counter and latency histogram",
            count,
            requests,
            lambda _r: (
                metrics.count_decision("ACCEPT", "ACCEPTED", "SHOPPER"),
                metrics.latency.observe(0.0005),
            ),
        ),
        await time_rounds(
            "hand-off to the writer thread and back, empty transaction",
            count,
            requests,
            lambda _r: store.writer.submit(empty),
        ),
        await time_rounds(
            "commit of the decision and its event, this thread",
            count,
            jobs,
            steps.commit_here,
        ),
        await time_rounds(
            "commit of the decision and its event, writer thread",
            count,
            jobs,
            store.writer.submit,
        ),
        await time_rounds(
            "whole decision: Resolver.resolve, one at a time",
            count,
            requests,
            lambda r: resolver.resolve(r, time.perf_counter()),
        ),
    ]
    steps.direct.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=1_000_000)
    parser.add_argument("--decisions", type=int, default=3000, help="decisions per round")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/identity-connector-bench"))
    args = parser.parse_args()
    if args.identities <= 0 or args.decisions <= 0:
        parser.error("--identities and --decisions must be positive integers")

    args.workdir.mkdir(parents=True, exist_ok=True)
    records = args.workdir / f"identities-{args.identities}.jsonl"
    generate_records(records, args.identities)
    run_dir = args.workdir / "steps-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    config_path = write_config(run_dir, port=1)
    _seconds, summary = import_records(config_path, records)
    print(summary, file=sys.stderr)

    config = load_config(config_path)
    database = Path(config.database.path)
    log_file = (run_dir / "steps.log").open("w", encoding="utf-8")
    configure_logging("info", "json", stream=log_file)
    store = Store.open(database, config.database.secret_path)
    resolver = Resolver(store, config, Metrics())
    try:
        results = uvloop.run(measure(store, resolver, database, args))
    finally:
        store.close()
        log_file.close()

    print(f"Machine: {os.cpu_count()} cores, {cpu_model()}, Python {platform.python_version()}")
    print(
        f"Identities: {args.identities:,}; median of {ROUNDS} rounds of {args.decisions:,}"
        " decisions, one at a time"
    )
    print()
    print("| step | us per decision |")
    print("|---|---|")
    for name, micros in results:
        print(f"| {name} | {micros:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
