"""Benchmark ResolveScan over TLS, with keep-alive and with a new connection per request.

Imports N identities once, then runs the daemon twice with the same settings, API key
([auth]) and database: once over plain HTTP and once with [tls] and a throwaway CA's server
certificate. Against each it measures:

- wrk with resolve_headers.lua (resolve.lua plus the API key header): one connection back to
  back, and four connections paced to 200 requests/s in total, each with keep-alive and with
  "Connection: close" (a new TCP connection and TLS handshake per request). wrk starts its
  latency clock when it writes the request, after connect and handshake, so its figures for
  new connections leave the handshake out;
- a sequential Python client (http.client, one request at a time) that times connect,
  handshake, request and response together, with keep-alive and with a new connection per
  request. It runs on the same 2 cores, so its figures include the client's own share of the
  handshake.

The per-client rate limit is off ([auth] rate_limit = 0) because wrk sends every request from
one address. Prints Markdown.

    .venv/bin/python tests/bench/bench_tls.py --identities 100000 --duration 15
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import secrets
import shutil
import ssl
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from tests.bench.bench_resolve import generate_records  # noqa: E402
from tests.bench.bench_sync import machine_load  # noqa: E402
from tests.conftest import free_port, now_rfc3339  # noqa: E402
from tests.tls_helpers import CertificateAuthority, client_context, write_api_key  # noqa: E402

PACED_RATE = 200
PACED_CONNECTIONS = 4
HEALTH_TIMEOUT = 30.0


def daemon_config(
    run_dir: Path, port: int, database: Path, key_file: Path, tls: tuple[Path, Path] | None
) -> Path:
    text = (
        f'[server]\nport = {port}\n[stores]\nids = ["STORE-001"]\n'
        f'[database]\npath = "{database}"\n[logging]\nformat = "json"\n'
        f'[auth]\napi_key_files = ["{key_file}"]\nrate_limit = 0\n'
    )
    if tls is not None:
        text += f'[tls]\ncert_file = "{tls[0]}"\nkey_file = "{tls[1]}"\n'
    config = run_dir / ("config-tls.toml" if tls else "config-plain.toml")
    config.write_text(text, encoding="utf-8")
    return config


def connect(port: int, context: ssl.SSLContext | None) -> http.client.HTTPConnection:
    if context is None:
        return http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    return http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)


def wait_healthy(port: int, context: ssl.SSLContext | None) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT
    while time.monotonic() < deadline:
        connection = connect(port, context)
        try:
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)
        finally:
            connection.close()
    raise RuntimeError(f"nothing healthy on port {port} after {HEALTH_TIMEOUT:.0f} s")


def negotiated(port: int, context: ssl.SSLContext) -> str:
    """Return the TLS version and cipher the daemon picks for a default client."""
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        connection.connect()
        sock = connection.sock
        assert isinstance(sock, ssl.SSLSocket)
        cipher = sock.cipher()
        return f"{sock.version()}, {cipher[0] if cipher else 'unknown cipher'}"
    finally:
        connection.close()


def run_wrk(
    url: str,
    connections: int,
    duration: int,
    identities: int,
    api_key: str,
    close: bool,
    rate: int = 0,
) -> dict[str, Any]:
    command = [
        "wrk",
        f"-t{min(2, connections)}",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        "5s",
        "-s",
        str(HERE / "resolve_headers.lua"),
        url,
    ]
    env = {
        **os.environ,
        "BENCH_SCRIPT_DIR": str(HERE),
        "BENCH_IDENTITIES": str(identities),
        "BENCH_RATE": str(rate),
        "BENCH_CONNECTIONS": str(connections),
        "BENCH_API_KEY": api_key,
        "BENCH_CONNECTION_CLOSE": "1" if close else "0",
    }
    output = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    match = re.search(r"BENCH (.*)", output)
    if match is None:
        raise RuntimeError(f"wrk printed no BENCH line:\n{output}")
    fields = dict(item.split("=") for item in match.group(1).split())
    settings = (
        f"BENCH_RATE={rate} BENCH_CONNECTIONS={connections} "
        f"BENCH_CONNECTION_CLOSE={int(close)} BENCH_API_KEY=<key> BENCH_SCRIPT_DIR={HERE}"
    )
    return {
        "command": f"{settings} {' '.join(command)}",
        "p50_ms": int(fields["p50_us"]) / 1000,
        "p99_ms": int(fields["p99_us"]) / 1000,
        "p999_ms": int(fields["p999_us"]) / 1000,
        "rps": int(fields["requests"]) / float(fields["seconds"]),
        # resolve.lua's errors include the responses wrk prints as "Non-2xx or 3xx".
        "errors": int(fields["errors"]),
    }


def scan_body(index: int, identities: int) -> bytes:
    key = f"BENCH-KEY-{(index * 7919) % identities:08d}"
    return json.dumps(
        {
            "requestId": str(uuid.uuid4()),
            "storeId": "STORE-001",
            "scanEvent": {
                "id": str(uuid.uuid4()),
                "timestamp": now_rfc3339(),
                "location": "ENTRY",
                "value": key,
                "channel": "OPTICAL",
            },
        }
    ).encode()


def run_client(
    port: int,
    context: ssl.SSLContext | None,
    api_key: str,
    requests: int,
    identities: int,
    new_connection: bool,
) -> dict[str, Any]:
    """Send ``requests`` scans one at a time; time connect (when new) to the last byte."""
    headers = {"Content-Type": "application/json", "x-api-key": api_key}
    latencies: list[float] = []
    errors = 0
    connection = None if new_connection else connect(port, context)
    if connection is not None:
        connection.connect()
    for index in range(requests):
        body = scan_body(index, identities)
        started = time.perf_counter()
        current = connection or connect(port, context)
        current.request("POST", "/v1/identity/scan", body, headers)
        response = current.getresponse()
        response.read()
        if new_connection:
            current.close()
        latencies.append(time.perf_counter() - started)
        errors += response.status != 200
    if connection is not None:
        connection.close()
    cuts = statistics.quantiles(latencies, n=1000, method="inclusive")
    return {
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": cuts[989] * 1000,
        "p999_ms": cuts[998] * 1000,
        "rps": len(latencies) / sum(latencies),
        "errors": errors,
    }


def measure(
    name: str,
    config: Path,
    port: int,
    context: ssl.SSLContext | None,
    args: argparse.Namespace,
    api_key: str,
    log_path: Path,
) -> dict[str, Any]:
    scheme = "https" if context else "http"
    url = f"{scheme}://127.0.0.1:{port}"
    load = machine_load()
    log = log_path.open("ab")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "daemon", "serve", "--config", str(config)],
        stdout=log,
        stderr=log,
        cwd=REPO,
    )
    log.close()
    results: dict[str, Any] = {"load": load}
    try:
        wait_healthy(port, context)
        if context is not None:
            results["negotiated"] = negotiated(port, context)
        # Warm-up: fills SQLite's page cache and the daemon's code paths.
        run_wrk(url, 4, 3, args.identities, api_key, close=False)
        for close in (False, True):
            mode = "new connection" if close else "keep-alive"
            results[f"wrk 1, {mode}"] = run_wrk(
                url, 1, args.duration, args.identities, api_key, close
            )
            results[f"wrk {PACED_CONNECTIONS} paced, {mode}"] = run_wrk(
                url,
                PACED_CONNECTIONS,
                args.duration,
                args.identities,
                api_key,
                close,
                rate=PACED_RATE,
            )
            results[f"client, {mode}"] = run_client(
                port, context, api_key, args.client_requests, args.identities, close
            )
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    print(f"{name} done", file=sys.stderr)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=100_000)
    parser.add_argument("--duration", type=int, default=15, help="seconds per wrk run")
    parser.add_argument(
        "--client-requests", type=int, default=2000, help="requests of each Python client run"
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/identity-connector-bench"))
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("error: wrk not found: apt-get install wrk", file=sys.stderr)
        return 2

    args.workdir.mkdir(parents=True, exist_ok=True)
    records = args.workdir / f"identities-{args.identities}.jsonl"
    generate_records(records, args.identities)
    run_dir = args.workdir / "tls-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    database = run_dir / "connector.sqlite3"
    log_path = run_dir / "daemon.log"

    ca = CertificateAuthority(run_dir / "tls", "bench-ca")
    server = ca.issue("localhost", server=True, file_stem="server")
    api_key = secrets.token_urlsafe(32)
    key_file = write_api_key(run_dir / "keys" / "gateway-1", api_key)
    port = free_port()
    plain_config = daemon_config(run_dir, port, database, key_file, None)
    tls_config = daemon_config(
        run_dir, port, database, key_file, (server.cert_file, server.key_file)
    )
    subprocess.run(
        [sys.executable, "-m", "daemon", "import", "--config", str(plain_config), str(records)],
        capture_output=True,
        check=True,
        cwd=REPO,
    )

    context = client_context(ca.cert_file)
    plain = measure("plain", plain_config, port, None, args, api_key, log_path)
    tls = measure("tls", tls_config, port, context, args, api_key, log_path)
    print_report(args, plain, tls)
    return 0


def print_report(args: argparse.Namespace, plain: dict[str, Any], tls: dict[str, Any]) -> None:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    print(
        f"Machine: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, "
        f"{ssl.OPENSSL_VERSION}"
    )
    print(f"- load before the plain HTTP runs: {plain['load']}")
    print(f"- load before the TLS runs: {tls['load']}")
    print(f"- TLS negotiated with a default Python client: {tls['negotiated']}")
    print(
        f"- identities: {args.identities:,}; wrk runs {args.duration} s each; "
        f"Python client runs {args.client_requests} requests each"
    )
    print()
    print("| Run | transport | p50 (ms) | p99 (ms) | p99.9 (ms) | requests/s | errors |")
    print("|---|---|---|---|---|---|---|")
    for run in (key for key in plain if key not in ("load", "negotiated")):
        for transport, results in (("HTTP", plain), ("HTTPS", tls)):
            figures = results[run]
            print(
                f"| {run} | {transport} | {figures['p50_ms']:.2f} | {figures['p99_ms']:.2f} "
                f"| {figures['p999_ms']:.2f} | {figures['rps']:,.0f} | {figures['errors']} |"
            )
    print()
    print("wrk commands (URL http:// or https://):")
    for run in (key for key in tls if key.startswith("wrk")):
        print(f"- {run}: `{tls[run]['command']}`")


if __name__ == "__main__":
    sys.exit(main())
