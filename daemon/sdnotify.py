"""Report service state to systemd over the sd_notify protocol.

systemd passes a datagram socket in ``NOTIFY_SOCKET``: a file system path
starting with ``/``, or an abstract socket name written with a leading ``@``.
Each notification is one datagram of newline-separated ``KEY=VALUE`` lines,
as described in sd_notify(3). Without ``NOTIFY_SOCKET`` every function here
does nothing and returns False, so the daemon runs the same outside systemd.

A failed send never raises. The first failure of a run of failures is logged
as a warning, repeats at debug level, and the first success after them once
more, so a missing socket does not flood the journal every watchdog interval.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import structlog

log = structlog.get_logger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"

# systemd drops a whole notification longer than PIPE_BUF, 4096 bytes on
# Linux (NOTIFY_BUFFER_MAX, which src/core/manager.c checks in systemd 252).
MAX_DATAGRAM_BYTES = 4096
# Room for the text of STATUS= even when ready() sends READY=1 with it.
MAX_STATUS_BYTES = MAX_DATAGRAM_BYTES - len("READY=1\nSTATUS=")

# Failed sends since the last successful one; read by _record_result().
_failed_sends = 0


def notify(*lines: str) -> bool:
    """Send ``KEY=VALUE`` lines as one datagram and return whether it was sent.

    Returns False without sending when ``NOTIFY_SOCKET`` is unset or empty,
    or when the send fails. Raises ValueError for a line without ``=`` and
    for a line with CR, LF or NUL, because systemd splits lines at CR and LF
    and would read the rest as another assignment. Also raises ValueError for
    a datagram longer than MAX_DATAGRAM_BYTES, which systemd would drop.
    """
    for line in lines:
        _validate_line(line)
    # "replace" turns lone surrogates, which cannot be UTF-8, into "?".
    datagram = "\n".join(lines).encode(errors="replace")
    if len(datagram) > MAX_DATAGRAM_BYTES:
        raise ValueError(
            f"sd_notify message of {len(datagram)} bytes is longer than "
            f"the maximum of {MAX_DATAGRAM_BYTES} bytes"
        )

    address = os.environ.get(NOTIFY_SOCKET_ENV, "")
    if not address or not lines:
        return False

    try:
        _send(address, datagram)
    except (OSError, ValueError) as error:
        _record_result(address, error)
        return False

    _record_result(address, None)
    return True


def ready(status_text: str | None = None) -> bool:
    """Tell systemd that start-up or a reload finished, optionally with a status line."""
    if status_text is None:
        return notify("READY=1")
    return notify("READY=1", f"STATUS={_clean_status(status_text)}")


def status(status_text: str) -> bool:
    """Set the free-form status line that `systemctl status` shows.

    Newlines and other control characters become spaces, and text longer
    than MAX_STATUS_BYTES is truncated.
    """
    return notify(f"STATUS={_clean_status(status_text)}")


def extend_timeout(seconds: float) -> bool:
    """Ask for ``seconds`` more before the start (or stop) in progress times out.

    systemd 236 and newer apply ``EXTEND_TIMEOUT_USEC`` only past the unit's own timeout, so
    a short extension never cuts ``TimeoutStartSec`` short.
    """
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


@contextlib.contextmanager
def extending_timeout(
    seconds: float, interval: float, limit: float, status_text: str
) -> Iterator[None]:
    """Send ``extend_timeout(seconds)`` every ``interval`` seconds while the body runs.

    For blocking work before READY whose length grows with the data, such as a schema
    migration of millions of rows. A thread sends the messages, so the body may block. The
    thread cannot tell a slow body from a hung one, so it stops extending after ``limit``
    seconds, and the unit's timeout applies again.
    """
    if not os.environ.get(NOTIFY_SOCKET_ENV):
        yield
        return
    done = threading.Event()
    deadline = time.monotonic() + limit

    def keep_extending() -> None:
        status(status_text)
        while not done.wait(interval) and time.monotonic() < deadline:
            extend_timeout(seconds)

    thread = threading.Thread(target=keep_extending, name="sd-extend-timeout", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def watchdog() -> bool:
    """Send a watchdog keep-alive ping (``WATCHDOG=1``)."""
    return notify("WATCHDOG=1")


def stopping() -> bool:
    """Tell systemd that the daemon is shutting down."""
    return notify("STOPPING=1")


def reloading() -> bool:
    """Tell systemd that a configuration reload started; send ready() when it ends.

    ``MONOTONIC_USEC`` is the CLOCK_MONOTONIC time of the request in µs. Type=notify
    ignores it; Type=notify-reload (systemd 253 and newer) requires it.
    """
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}")


def watchdog_interval() -> float | None:
    """Return the interval in seconds at which to call watchdog(), or None for no watchdog.

    That is half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises. None
    when ``WATCHDOG_USEC`` is unset, not a positive integer, or when
    ``WATCHDOG_PID`` is set and names another process, because then the
    watchdog belongs to that process.
    """
    raw_usec = os.environ.get(WATCHDOG_USEC_ENV, "")
    if not raw_usec:
        return None

    try:
        usec = int(raw_usec)
    except ValueError:
        log.warning("sdnotify.watchdog_invalid", variable=WATCHDOG_USEC_ENV, value=raw_usec)
        return None
    if usec <= 0:
        log.warning("sdnotify.watchdog_invalid", variable=WATCHDOG_USEC_ENV, value=raw_usec)
        return None

    raw_pid = os.environ.get(WATCHDOG_PID_ENV, "")
    if raw_pid:
        try:
            watchdog_pid = int(raw_pid)
        except ValueError:
            log.warning("sdnotify.watchdog_invalid", variable=WATCHDOG_PID_ENV, value=raw_pid)
            return None
        if watchdog_pid != os.getpid():
            return None

    return usec / 2 / 1_000_000


def _validate_line(line: str) -> None:
    if "=" not in line:
        raise ValueError(f"invalid sd_notify line {line!r}: expected KEY=VALUE")
    if any(char in line for char in "\r\n\0"):
        raise ValueError(f"invalid sd_notify line {line!r}: it must not contain CR, LF or NUL")


def _clean_status(text: str) -> str:
    cleaned = "".join(" " if ord(char) < 0x20 or ord(char) == 0x7F else char for char in text)
    encoded = cleaned.encode(errors="replace")
    if len(encoded) <= MAX_STATUS_BYTES:
        return cleaned
    # The cut may split a multi-byte character, so drop the partial one.
    return encoded[:MAX_STATUS_BYTES].decode(errors="ignore")


def _socket_address(address: str) -> str:
    """Convert a NOTIFY_SOCKET value to an AF_UNIX address, or raise ValueError."""
    if address.startswith("/"):
        return address
    if address.startswith("@") and len(address) > 1:
        # Linux abstract namespace: the name starts with a NUL byte on the wire.
        return "\0" + address[1:]
    raise ValueError("NOTIFY_SOCKET is neither an absolute path nor an @abstract name")


def _send(address: str, datagram: bytes) -> None:
    target = _socket_address(address)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        # MSG_DONTWAIT keeps the asyncio event loop from blocking when the
        # receiver's queue is full. Such a send fails with BlockingIOError.
        sock.sendto(datagram, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, target)


def _record_result(address: str, error: Exception | None) -> None:
    global _failed_sends

    if error is None:
        if _failed_sends:
            log.info("sdnotify.send_recovered", socket=address, failed_sends=_failed_sends)
        _failed_sends = 0
        return

    _failed_sends += 1
    if _failed_sends == 1:
        log.warning("sdnotify.send_failed", socket=address, error=str(error))
    else:
        log.debug(
            "sdnotify.send_failed", socket=address, error=str(error), failed_sends=_failed_sends
        )
