"""Log events straight to journald with structured fields (the native journal protocol).

Under systemd, stdout lines reach the journal as plain MESSAGE text. Sent over the journal's
own datagram socket instead, each event keeps its fields: ``journalctl -o json`` shows them,
``journalctl EVENT=scan.decided ACTION=REJECT`` filters by them, and PRIORITY follows the
log level. The protocol is the one described in systemd's "Native Journal Protocol" document.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import sys
from typing import Any, TextIO

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "identity-connector"

PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
# Fields the journal sets or interprets itself; an event field of the same name is renamed.
_RESERVED = {"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "EVENT", "CODE_FILE", "CODE_LINE"}
_INVALID_NAME_CHARACTERS = re.compile(r"[^A-Z0-9_]")


def stdout_is_journal(stream: TextIO) -> bool:
    """Return whether systemd connected ``stream`` to the journal (JOURNAL_STREAM matches it)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{status.st_dev}:{status.st_ino}"


def field_name(key: str) -> str:
    """Turn an event key such as ``scan_event_id`` into a journal field name."""
    name = _INVALID_NAME_CHARACTERS.sub("_", key.upper()).lstrip("_") or "FIELD"
    if name[0].isdigit() or name in _RESERVED:
        name = "FIELD_" + name
    return name


def encode_field(name: str, value: str) -> bytes:
    """Encode one field; values with a newline use the length-prefixed binary form."""
    data = value.encode("utf-8", "replace")
    if b"\n" not in data:
        return name.encode() + b"=" + data + b"\n"
    return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"


def render(event_dict: dict[str, Any]) -> bytes:
    """Build the datagram for one structlog event."""
    fields = dict(event_dict)
    event = str(fields.pop("event", ""))
    level = str(fields.pop("level", "info"))
    fields.pop("timestamp", None)  # the journal stamps each entry itself
    summary = " ".join(f"{key}={value}" for key, value in fields.items() if key != "exception")
    message = f"{event} {summary}".strip()

    parts = [
        encode_field("MESSAGE", message),
        encode_field("PRIORITY", str(PRIORITIES.get(level, 6))),
        encode_field("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER),
        encode_field("EVENT", event),
    ]
    for key, value in fields.items():
        if value is None:
            continue
        parts.append(encode_field(field_name(key), str(value)))
    return b"".join(parts)


class JournalLogger:
    """A structlog logger that sends rendered datagrams to journald.

    When a send fails (journald restarting, a full socket buffer), the entry goes to
    ``fallback`` as text instead, so no event is lost silently.
    """

    def __init__(self, socket_path: str = JOURNAL_SOCKET, fallback: TextIO | None = None) -> None:
        self._socket_path = socket_path
        self._fallback = fallback or sys.stdout
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def msg(self, datagram: bytes) -> None:
        try:
            self._socket.sendto(datagram, self._socket_path)
        except OSError as exc:
            self._fallback.write(
                f"journal send failed ({exc.strerror}): "
                + datagram.decode("utf-8", "replace").replace("\n", " | ")
                + "\n"
            )
            self._fallback.flush()

    debug = info = warning = warn = error = critical = exception = log = msg


class JournalLoggerFactory:
    def __init__(self, socket_path: str, fallback: TextIO) -> None:
        self._logger = JournalLogger(socket_path, fallback)

    def __call__(self, *_args: Any) -> JournalLogger:
        return self._logger


def journal_renderer(_logger: Any, _name: str, event_dict: dict[str, Any]) -> bytes:
    return render(event_dict)
