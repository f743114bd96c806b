"""structlog set-up: journald fields under systemd, JSON lines for machines, text on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import msgspec
import structlog

from daemon.journal import JOURNAL_SOCKET, JournalLoggerFactory, journal_renderer, stdout_is_journal

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_JSON = msgspec.json.Encoder(enc_hook=str)


def _serialize(event: dict[str, Any], **_kwargs: Any) -> str:
    return _JSON.encode(event).decode()


def _render_json_bytes(_logger: Any, _name: str, event: dict[str, Any]) -> bytes:
    return _JSON.encode(event)


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    journal_socket: str = JOURNAL_SOCKET,
) -> None:
    """Send structured events to ``stream`` (stdout by default) or to journald.

    ``fmt`` "auto" sends events to journald with their fields when systemd connected the
    stream to the journal, writes readable lines on a terminal, and JSON lines otherwise.
    Exceptions logged with ``log.exception`` carry their traceback in the ``exception`` field
    of the same event.
    """
    stream = stream or sys.stdout
    use_journal = fmt == "journal" or (fmt == "auto" and stdout_is_journal(stream))
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if use_journal:
        processors += [structlog.processors.format_exc_info, journal_renderer]
        structlog.configure(
            processors=processors,
            wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
            logger_factory=JournalLoggerFactory(journal_socket, stream),
            cache_logger_on_first_use=True,
        )
        return
    binary = getattr(stream, "buffer", None)
    if use_json and binary is not None:
        # Bytes straight from msgspec to the binary stream: no str round trip per event.
        processors += [structlog.processors.format_exc_info, _render_json_bytes]
        factory: Any = structlog.BytesLoggerFactory(file=binary)
    elif use_json:
        processors += [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_serialize),
        ]
        factory = structlog.WriteLoggerFactory(file=stream)
    else:
        # structlog's default formatter, when the rich package is importable, prints the local
        # variables of every frame, and those can hold a scanned value or a key.
        processors.append(
            structlog.dev.ConsoleRenderer(
                colors=False, exception_formatter=structlog.dev.plain_traceback
            )
        )
        factory = structlog.WriteLoggerFactory(file=stream)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
