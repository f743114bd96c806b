"""The local event stream: decisions and device health as Server-Sent Events.

Publishing never waits for a client. Each client has a bounded queue, and a
client whose queue is full is dropped: its stream ends, and it may reconnect.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable
from typing import Any

import msgspec
import structlog
from aiohttp import web

log = structlog.get_logger(__name__)

_ENCODER = msgspec.json.Encoder()

# Sent once when a stream opens, so clients see the headers and the first bytes at once.
STREAM_OPENED = b": stream opened\n\n"
KEEPALIVE = b": keepalive\n\n"


def encode_event(event: str, data: dict[str, Any]) -> bytes:
    """Frame one SSE event; JSON data has no raw newline, so it fits one ``data:`` line."""
    return b"event: " + event.encode() + b"\ndata: " + _ENCODER.encode(data) + b"\n\n"


class Subscriber:
    """One connected stream client and its queue of framed events."""

    def __init__(self, peer: str, queue_size: int) -> None:
        self.peer = peer
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=queue_size)
        self.dropped = False

    def offer(self, frame: bytes) -> bool:
        """Queue a frame without waiting; return False when the queue is full."""
        if self.dropped:
            return True
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            return False
        return True

    def end(self) -> None:
        """Discard the queued frames and make the stream end at its next read."""
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)


class EventHub:
    """Fan events out to the connected stream clients."""

    def __init__(self) -> None:
        self._subscribers: set[Subscriber] = set()
        self.dropped_clients = 0

    @property
    def clients(self) -> int:
        return len(self._subscribers)

    def subscribe(self, peer: str, queue_size: int) -> Subscriber:
        subscriber = Subscriber(peer, queue_size)
        self._subscribers.add(subscriber)
        log.info("events.client_connected", peer=peer, clients=len(self._subscribers))
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)
        log.info(
            "events.client_disconnected",
            peer=subscriber.peer,
            dropped=subscriber.dropped,
            clients=len(self._subscribers),
        )

    def publish(self, event: str, data: dict[str, Any]) -> None:
        """Queue an event for every client; drop the clients that cannot take it."""
        if not self._subscribers:
            return
        frame = encode_event(event, data)
        for subscriber in list(self._subscribers):
            if subscriber.offer(frame):
                continue
            subscriber.dropped = True
            subscriber.end()
            self._subscribers.discard(subscriber)
            self.dropped_clients += 1
            log.warning(
                "events.client_dropped",
                peer=subscriber.peer,
                queue_size=subscriber.queue.maxsize,
                detail="the client read too slowly; it may reconnect",
            )

    def close(self) -> None:
        """End every stream, as at shutdown."""
        for subscriber in list(self._subscribers):
            subscriber.end()
        self._subscribers.clear()


def client_allowed(remote: str | None, networks: Iterable[str]) -> bool:
    """Tell whether a peer address lies in one of the CIDR ``networks``.

    An IPv4 client on a dual-stack socket shows up as ``::ffff:a.b.c.d`` and is
    matched as the IPv4 address. A peer without an IP address is rejected.
    """
    if remote is None:
        return False
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in ipaddress.ip_network(network, strict=False) for network in networks)


async def stream(
    request: web.Request,
    hub: EventHub,
    *,
    queue_size: int,
    keepalive: float,
    initial: list[bytes],
) -> web.StreamResponse:
    """Serve one SSE stream until the client leaves, is dropped, or the daemon stops.

    ``initial`` frames go first, such as the current health of every device.
    """
    peer = request.remote or "unknown"
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            # Tells nginx-style proxies not to buffer the stream.
            "X-Accel-Buffering": "no",
        }
    )
    # Subscribe before the headers go out: a client that has the headers gets every later event.
    subscriber = hub.subscribe(peer, queue_size)
    try:
        await response.prepare(request)
        await response.write(STREAM_OPENED + b"".join(initial))
        while True:
            try:
                frame = await asyncio.wait_for(subscriber.queue.get(), keepalive)
            except TimeoutError:
                # Writing also notices a client that left without closing the connection.
                frame = KEEPALIVE
            if frame is None:
                break
            await response.write(frame)
    except ConnectionResetError:
        pass
    finally:
        hub.unsubscribe(subscriber)
    return response
