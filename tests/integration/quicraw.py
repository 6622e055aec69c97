"""A raw MQTT-over-QUIC test client on aioquic's own client, for the listener's black-box tests.

Stream by stream, bytes in and packets out, with the hand-built packets of rawclient.py (no
shoal code), so a test can put any packet on any stream and see on which stream each answer
comes back. Runs on its own asyncio loop in the test; the broker is a real process.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from contextlib import AsyncExitStack
from typing import Any

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration

from tests.integration.rawclient import NAMES, Packet

TIMEOUT = 5.0


class RawStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.stream_id: int = writer.get_extra_info("stream_id")

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def end(self) -> None:
        self.writer.write_eof()

    def _parse(self) -> Packet | None:
        buf = self.buf
        if len(buf) < 2:
            return None
        value, mult, pos = 0, 1, 1
        while True:
            if pos >= len(buf):
                return None
            byte = buf[pos]
            value += (byte & 0x7F) * mult
            pos += 1
            if not byte & 0x80:
                break
            mult *= 128
        if len(buf) < pos + value:
            return None
        p = Packet(buf[0], bytes(buf[pos:pos + value]))
        del buf[:pos + value]
        return p

    async def read(self, timeout: float = TIMEOUT) -> Packet | None:
        """The next packet, or None when the stream (or connection) ends.
        Raises TimeoutError if nothing comes."""
        async with asyncio.timeout(timeout):
            while True:
                p = self._parse()
                if p is not None:
                    return p
                chunk = await self.reader.read(65536)
                if not chunk:
                    return None
                self.buf += chunk

    async def expect(self, ptype: int, timeout: float = TIMEOUT) -> Packet:
        p = await self.read(timeout)
        assert p is not None, f"stream {self.stream_id} ended while waiting for {NAMES[ptype]}"
        assert p.type == ptype, f"expected {NAMES[ptype]} on stream {self.stream_id}, got {p!r}"
        return p

    async def silent(self, timeout: float = 0.3) -> None:
        """Nothing arrives on this stream within ``timeout`` (a negative check, bounded)."""
        try:
            p = await self.read(timeout)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected {p!r} on stream {self.stream_id}")


class RawQuic:
    """One QUIC connection to the broker; ``stream()`` opens the next client bidi stream."""

    def __init__(self) -> None:
        self._stack = AsyncExitStack()
        self.protocol: QuicConnectionProtocol | None = None
        self._next_id = 0

    @classmethod
    async def open(cls, host: str, port: int, **config: Any) -> RawQuic:
        self = cls()
        cfg = QuicConfiguration(is_client=True, alpn_protocols=config.pop("alpn", ["mqtt"]),
                                verify_mode=ssl.CERT_NONE, **config)
        self.protocol = await self._stack.enter_async_context(
            connect(host, port, configuration=cfg, wait_connected=True))
        return self

    async def stream(self) -> RawStream:
        """The next client bidi stream (0, 4, 8, ...). aioquic's create_stream hands out the
        same id again until data is sent on it, so the ids are counted here."""
        assert self.protocol is not None
        reader, writer = self.protocol._create_stream(self._next_id)
        self._next_id += 4
        return RawStream(reader, writer)

    async def rebind(self, host: str = "127.0.0.1", new_id: bool = False) -> None:
        """Send from a new local UDP port (and address ``host``) from now on: to the server,
        a client whose address changed (NAT rebinding). ``new_id``: also switch to another
        of the server's connection ids, as RFC 9000 recommends on a path change."""
        assert self.protocol is not None
        loop = asyncio.get_running_loop()
        old = self.protocol._transport
        # aioquic's connect() uses a dual-stack IPv6 socket and IPv4-mapped peer addresses
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::ffff:" + host, 0))
        await loop.create_datagram_endpoint(lambda: self.protocol, sock=sock)
        old.close()
        if new_id:
            self.protocol.change_connection_id()
        # a moved client speaks first (here a PING), or the server keeps sending to the old
        # address; its next packet from the new address starts path validation
        self.protocol._quic.send_ping(0)
        self.protocol.transmit()

    def server_cid(self) -> bytes:
        """The server's connection id this client sends to now (its first byte names the
        shard holding the connection)."""
        assert self.protocol is not None
        return self.protocol._quic._peer_cid.cid

    async def closed(self, timeout: float = TIMEOUT) -> None:
        assert self.protocol is not None
        async with asyncio.timeout(timeout):
            await self.protocol.wait_closed()

    def close_info(self) -> Any:
        assert self.protocol is not None
        return self.protocol._quic._close_event

    async def aclose(self) -> None:
        await self._stack.aclose()
