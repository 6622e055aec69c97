"""Loopback relays that simulate NAT rebinding without privileges.

:class:`UDPRelay` sits between QUIC clients and a broker: clients send to the
relay's downstream port, and the relay forwards each client's datagrams to the
broker from an upstream socket of its own, as a NAT would. :meth:`UDPRelay.rebind`
swaps every upstream socket for a new one on a new source port and, if asked,
a new source address 127.0.0.x: the broker sees the client's address change
mid-connection, exactly what a NAT that forgot its mapping does. The client
itself notices nothing (its own socket does not change), so a test sees whether
the *server* keeps the connection.

:class:`TCPRelay` is the same for TCP. A NAT rebinding cannot move a TCP
connection (the 4-tuple is the connection), so :meth:`TCPRelay.rebind` aborts
every relayed connection on both sides, as a NAT's RST or silent drop does.

Both run on the test's own event loop (``async with UDPRelay(...) as relay``).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

Addr = tuple[Any, ...]


class _Upstream(asyncio.DatagramProtocol):
    """One client's socket towards the broker; replies go back to that client."""

    def __init__(self, relay: UDPRelay, client: Addr) -> None:
        self.relay = relay
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        relay = self.relay
        if relay.upstreams.get(self.client) is not self or relay.down is None:
            relay.dropped_late += 1  # a reply to a mapping the "NAT" already forgot
            return
        relay.to_client += 1
        relay.down.sendto(data, self.client)

    def error_received(self, exc: Exception) -> None:
        pass


class _Downstream(asyncio.DatagramProtocol):
    def __init__(self, relay: UDPRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.relay._from_client(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass


class UDPRelay:
    """A loopback UDP "NAT" in front of ``target`` whose mappings can be rebound."""

    def __init__(self, target: tuple[str, int], listen_host: str = "127.0.0.1",
                 upstream_host: str = "127.0.0.1") -> None:
        self.target = target
        self.listen_host = listen_host
        self.upstream_host = upstream_host
        self.down: asyncio.DatagramTransport | None = None
        self.port = 0
        self.upstreams: dict[Addr, _Upstream] = {}
        self._pending: dict[Addr, list[bytes]] = {}  # datagrams queued while a socket opens
        self.to_server = 0
        self.to_client = 0
        self.dropped_late = 0
        self.rebinds = 0

    async def start(self) -> UDPRelay:
        loop = asyncio.get_running_loop()
        self.down, _ = await loop.create_datagram_endpoint(
            lambda: _Downstream(self), local_addr=(self.listen_host, 0))
        self.port = self.down.get_extra_info("sockname")[1]
        return self

    async def __aenter__(self) -> UDPRelay:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    @property
    def address(self) -> tuple[str, int]:
        return (self.listen_host, self.port)

    def upstream_addresses(self) -> list[Addr]:
        """The source addresses the broker currently sees, one per client."""
        return [u.transport.get_extra_info("sockname") for u in self.upstreams.values()
                if u.transport is not None]

    def _from_client(self, data: bytes, addr: Addr) -> None:
        up = self.upstreams.get(addr)
        if up is not None and up.transport is not None:
            self.to_server += 1
            up.transport.sendto(data, self.target)
            return
        queued = self._pending.get(addr)
        if queued is not None:
            queued.append(data)
            return
        self._pending[addr] = [data]
        asyncio.get_running_loop().create_task(self._open(addr))

    async def _open(self, client: Addr) -> None:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _Upstream(self, client), local_addr=(self.upstream_host, 0))
        old = self.upstreams.get(client)
        self.upstreams[client] = proto
        if old is not None and old.transport is not None:
            old.transport.close()
        for data in self._pending.pop(client, []):
            self.to_server += 1
            transport.sendto(data, self.target)

    async def rebind(self, upstream_host: str | None = None) -> list[Addr]:
        """Give every client a new upstream socket (new port, and ``upstream_host`` if given).
        The old mappings are forgotten at once: late replies to them are dropped. Returns the
        new source addresses."""
        if upstream_host is not None:
            self.upstream_host = upstream_host
        self.rebinds += 1
        loop = asyncio.get_running_loop()
        for client in list(self.upstreams):
            transport, proto = await loop.create_datagram_endpoint(
                lambda c=client: _Upstream(self, c), local_addr=(self.upstream_host, 0))  # type: ignore[misc]
            old = self.upstreams[client]
            self.upstreams[client] = proto
            if old.transport is not None:
                old.transport.close()
        return self.upstream_addresses()

    def close(self) -> None:
        for up in self.upstreams.values():
            if up.transport is not None:
                up.transport.close()
        self.upstreams.clear()
        if self.down is not None:
            self.down.close()
            self.down = None


class TCPRelay:
    """A loopback TCP forwarder whose "address change" kills every relayed connection."""

    def __init__(self, target: tuple[str, int], listen_host: str = "127.0.0.1") -> None:
        self.target = target
        self.listen_host = listen_host
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0
        self.killed = 0

    async def start(self) -> TCPRelay:
        self.server = await asyncio.start_server(self._accept, self.listen_host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aenter__(self) -> TCPRelay:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @property
    def address(self) -> tuple[str, int]:
        return (self.listen_host, self.port)

    async def _accept(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            ur, uw = await asyncio.open_connection(*self.target)
        except OSError:
            w.close()
            return
        pair = (w, uw)
        self._pairs.append(pair)
        for src, dst in ((r, uw), (ur, w)):
            t = asyncio.get_running_loop().create_task(self._pipe(src, dst))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                dst.write(data)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            dst.close()

    def rebind(self) -> int:
        """The NAT mapping changed: every relayed TCP connection is reset on both sides.
        Returns how many were killed."""
        n = 0
        for a, b in self._pairs:
            for w in (a, b):
                sock = w.get_extra_info("socket")
                if sock is not None:
                    # SO_LINGER 0 makes close() send RST, as a NAT's reset does.
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    except OSError:
                        pass
                w.transport.abort()
            n += 1
        self._pairs.clear()
        self.killed += n
        return n

    async def close(self) -> None:
        self.rebind()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
