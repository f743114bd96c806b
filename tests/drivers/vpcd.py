"""A virtual card that plugs into vsmartcard's vpcd reader driver over TCP.

vpcd (loaded by pcscd) listens on a port per reader slot; a card is inserted
by connecting to it and removed by closing the connection. Every message in
either direction is a 2-byte big-endian length followed by that many bytes.
vpcd sends one-byte control messages (00 power off, 01 power on, 02 reset,
04 get ATR) and longer messages as command APDUs. The card replies to get ATR
with its ATR and to each APDU with a response APDU. Power and reset get no reply.
pcscd polls presence by asking for the ATR about every 400 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Callable, Mapping

VPCD_HOST = "127.0.0.1"
VPCD_PORT = 35963  # slot 0; slot 1 ("Virtual PCD 00 01") listens on the next port
VPCD_READER = "Virtual PCD 00 00"  # the PC/SC name pcscd gives slot 0

CONTROL_POWER_OFF = 0x00
CONTROL_POWER_ON = 0x01
CONTROL_RESET = 0x02
CONTROL_GET_ATR = 0x04

GET_UID = bytes.fromhex("FFCA000000")
INSTRUCTION_NOT_SUPPORTED = bytes.fromhex("6D00")


def contactless_atr(historical: bytes) -> bytes:
    """Build the ATR a PC/SC Part 3 reader reports for a contactless card."""
    assert len(historical) <= 15, "T0 has room for 15 historical bytes"
    body = bytes([0x80 | len(historical), 0x80, 0x01]) + historical
    check = 0
    for byte in body:
        check ^= byte
    return b"\x3b" + body + bytes([check])


# MIFARE Classic 1K as a PC/SC Part 3 reader announces it (storage card, RID A000000306).
MIFARE_CLASSIC_ATR = contactless_atr(bytes.fromhex("804F0CA00000030603000100000000"))
# A contact card speaking T=0 with two historical bytes.
CONTACT_ATR = bytes.fromhex("3B021450")

Responder = Callable[[bytes], bytes | None]


def answers(table: Mapping[bytes, bytes | list[bytes] | None]) -> Responder:
    """Make a responder from a table of command APDU -> response, or list of responses in turn.

    A None response closes the connection instead of answering (card pulled
    away mid-command). Commands not in the table get 6D 00.
    """
    queues = {
        command: list(reply) if isinstance(reply, list) else reply
        for command, reply in table.items()
    }

    def respond(command: bytes) -> bytes | None:
        if command not in queues:
            return INSTRUCTION_NOT_SUPPORTED
        reply = queues[command]
        if isinstance(reply, list):
            return reply.pop(0) if len(reply) > 1 else reply[0]
        return reply

    return respond


def uid_card(uid_hex: str) -> Responder:
    """A card whose GET DATA answers the given UID with 90 00."""
    return answers({GET_UID: bytes.fromhex(uid_hex) + b"\x90\x00"})


def wait_until_card_absent(reader: str, timeout: float) -> None:
    """Block until pcscd reports no card on ``reader``.

    vpcd notices a closed card connection only at pcscd's next presence poll
    (about every 400 ms), so a test that inserts the next card sooner would
    meet the previous card's stale state.
    """
    from smartcard import scard

    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    assert hresult == scard.SCARD_S_SUCCESS, scard.SCardGetErrorMessage(hresult)
    try:
        states = [(reader, scard.SCARD_STATE_UNAWARE)]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hresult, new_states = scard.SCardGetStatusChange(context, 100, states)
            if hresult == scard.SCARD_S_SUCCESS:
                _name, state, _atr = new_states[0]
                if not state & scard.SCARD_STATE_PRESENT:
                    return
                states = [(reader, state & ~scard.SCARD_STATE_CHANGED)]
            elif hresult != scard.SCARD_E_TIMEOUT:
                raise AssertionError(
                    f"waiting for card removal failed: {scard.SCardGetErrorMessage(hresult)}"
                )
        raise AssertionError(f"pcscd still reports a card on {reader!r} after {timeout} s")
    finally:
        scard.SCardReleaseContext(context)


class VirtualCard:
    """One card presented to the vpcd reader; records every APDU it receives."""

    def __init__(self, atr: bytes, respond: Responder, *, port: int = VPCD_PORT) -> None:
        self.atr = atr
        self.respond = respond
        self.port = port
        self.commands: list[bytes] = []
        self._command_seen = asyncio.Condition()
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def insert(self) -> None:
        reader, self._writer = await asyncio.open_connection(VPCD_HOST, self.port)
        self._task = asyncio.create_task(self._serve(reader), name=f"virtual-card-{self.port}")

    async def remove(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
            self._writer = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def inserted(self) -> bool:
        return self._writer is not None and self._task is not None and not self._task.done()

    async def wait_for_command(self, prefix: bytes, timeout: float) -> bytes:
        """Return the first received command APDU that starts with ``prefix``."""

        def find() -> bytes | None:
            return next((command for command in self.commands if command.startswith(prefix)), None)

        async with self._command_seen:
            await asyncio.wait_for(self._command_seen.wait_for(find), timeout)
        found = find()
        assert found is not None
        return found

    async def _serve(self, reader: asyncio.StreamReader) -> None:
        assert self._writer is not None
        writer = self._writer
        try:
            while True:
                header = await reader.readexactly(2)
                (length,) = struct.unpack(">H", header)
                message = await reader.readexactly(length)
                reply = await self._handle(message)
                if reply is None:
                    continue
                writer.write(struct.pack(">H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, _Pulled):
            writer.close()

    async def _handle(self, message: bytes) -> bytes | None:
        if len(message) == 1:
            if message[0] == CONTROL_GET_ATR:
                return self.atr
            return None  # power on, power off and reset have no answer

        async with self._command_seen:
            self.commands.append(message)
            self._command_seen.notify_all()
        reply = self.respond(message)
        if reply is None:
            raise _Pulled
        return reply


class _Pulled(Exception):
    """The card leaves the field before answering the current command."""
