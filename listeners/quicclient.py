"""A QUIC client byte pipe on aioquic, with streams that look like asyncio transports.

Knows nothing of MQTT. One :class:`QuicStreamClient` is one QUIC connection
driven by our own :class:`asyncio.DatagramProtocol` rather than
``aioquic.asyncio.connect``: we own the UDP socket, so :meth:`QuicStreamClient.rebind`
can swap it mid-connection (a client address change, what NAT rebinding or a
Wi-Fi to cellular hand-over looks like to the server, which validates the new
path). The driver is the usual sans-IO loop: feed datagrams and timer expiries
to the ``QuicConnection``, then transmit whatever it wants to send, after every
event.

Each client-initiated bidirectional stream is a :class:`QuicStream`, which is to
an attached :class:`asyncio.Protocol` what a TCP transport is: ``write``,
``close``, ``is_closing``, ``get_extra_info``; the protocol gets
``connection_made``, ``data_received``, ``eof_received`` and ``connection_lost``.
Code written for TCP (an MQTT client) sits on a stream unchanged::

    client = await QuicStreamClient.connect("127.0.0.1", 14567, alpn="mqtt")
    stream = client.open_stream()          # the first one is stream id 0
    stream.set_protocol(my_protocol)       # my_protocol.connection_made(stream)
    stream.write(b"...")
    await client.rebind()                  # new local UDP port; same connection
    client.close(); await client.wait_closed()
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionState
from aioquic.quic.events import (
    ConnectionTerminated, HandshakeCompleted, QuicEvent, StreamDataReceived, StreamReset,
)

__all__ = ["QuicStreamClient", "QuicStream", "QuicConnectError"]

# How long connect() waits for the handshake. A loopback handshake takes a few ms;
# 10 s covers a loaded CI machine and a lost Initial (aioquic re-sends after its probe timeout).
DEFAULT_CONNECT_TIMEOUT = 10.0

# QUIC idle timeout we offer (seconds). MQTT keepalive normally keeps a connection busier than
# this; it only bounds how long a dead server goes unnoticed when the application is silent.
DEFAULT_IDLE_TIMEOUT = 60.0


# Write-side back-pressure per stream, on bytes written and not yet acknowledged by the peer
# (aioquic buffers without bound): pause the protocol above 256 KiB, resume below 64 KiB, as
# asyncio's own transports default to and as the server's QUIC streams do. A publisher flat out
# over a slow path then waits instead of growing the buffer.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024


class QuicConnectError(ConnectionError):
    """The QUIC handshake failed or timed out."""


class _Datagrams(asyncio.DatagramProtocol):
    """The UDP socket's protocol: hands datagrams to the client, tagged with the socket they
    came in on so datagrams still arriving on a socket we rebound away from are dropped."""

    def __init__(self, client: QuicStreamClient) -> None:
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.client._datagram_received(self, data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: QUIC's own timers decide whether the path is dead.
        pass


class QuicStream:
    """One bidirectional QUIC stream as an asyncio-transport-like object."""

    def __init__(self, client: QuicStreamClient, stream_id: int) -> None:
        self.client = client
        self.stream_id = stream_id
        self.protocol: asyncio.Protocol | None = None
        self._pending: list[bytes] = []  # data that arrived before a protocol was attached
        self._eof = False  # the peer finished its side
        self._write_paused = False
        self._high = WRITE_HIGH_WATER
        self._low = WRITE_LOW_WATER
        self._closing = False  # we finished our side (or the connection went away)
        self._lost = False

    # -- attaching a protocol ----------------------------------------------------------

    def set_protocol(self, protocol: asyncio.Protocol) -> None:
        self.protocol = protocol
        protocol.connection_made(self)  # type: ignore[arg-type]
        pending, self._pending = self._pending, []
        for data in pending:
            protocol.data_received(data)
        if self._eof:
            protocol.eof_received()
        if self._lost:
            protocol.connection_lost(self.client._close_exc)

    def get_protocol(self) -> asyncio.Protocol | None:
        return self.protocol

    # -- the transport side --------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._lost:
            return
        self.client._send(self.stream_id, bytes(data), end_stream=False)
        if not self._write_paused and self.get_write_buffer_size() > self._high:
            self._write_paused = True
            self.client._paused.add(self)
            if self.protocol is not None:
                self.protocol.pause_writing()

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def write_eof(self) -> None:
        """Finish our side of the stream (QUIC FIN)."""
        if self._closing or self._lost:
            return
        self._closing = True
        self.client._send(self.stream_id, b"", end_stream=True)

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        """Finish our side; the protocol hears connection_lost once the stream is done or the
        connection ends. Closing the control stream is how EMQX-style servers end a connection,
        so callers that want the whole connection gone call the client's close()."""
        self.write_eof()

    def abort(self) -> None:
        self.client._reset(self.stream_id)
        self._finish(None)

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.client.remote_addr
        if name == "sockname":
            return self.client.local_addr
        if name == "stream_id":
            return self.stream_id
        return default

    def pause_reading(self) -> None:
        # QUIC flow control would be the right lever; the MQTT client reads as fast as it can.
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is not None:
            self._high = high
        self._low = low if low is not None else min(self._low, self._high // 4)

    def get_write_buffer_size(self) -> int:
        """Bytes written and not yet acknowledged (reads aioquic's sender buffer: the pinned
        version's private attributes, as listeners/quic.py does)."""
        stream = self.client.quic._streams.get(self.stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return int(sender._buffer_stop - sender._buffer_start)

    def _maybe_resume(self) -> bool:
        """Resume a paused protocol once the peer acknowledged enough. True if resumed."""
        if self._write_paused and (self._lost or self.get_write_buffer_size() <= self._low):
            self._write_paused = False
            if self.protocol is not None and not self._lost:
                self.protocol.resume_writing()
            return True
        return False

    # -- events from the connection ----------------------------------------------------

    def _data(self, data: bytes, end_stream: bool) -> None:
        if self._lost:
            return
        if data:
            if self.protocol is None:
                self._pending.append(data)
            else:
                self.protocol.data_received(data)
        if end_stream and not self._eof:
            self._eof = True
            if self.protocol is not None:
                self.protocol.eof_received()
            self._finish(None)

    def _finish(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._write_paused = False
        self.client._paused.discard(self)
        if self.protocol is not None:
            self.protocol.connection_lost(exc)


class QuicStreamClient:
    """One QUIC client connection. Create it with :meth:`connect`."""

    def __init__(self, host: str, port: int, configuration: QuicConfiguration,
                 local_host: str | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.remote_host = host
        self.remote_port = port
        self._remote: tuple[Any, ...] = (host, port)
        self.quic = QuicConnection(configuration=configuration)
        self._udp: _Datagrams | None = None
        self._local_host = local_host
        self.local_addr: tuple[Any, ...] | None = None
        self.streams: dict[int, QuicStream] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._handshake: asyncio.Future[None] = self.loop.create_future()
        self._closed: asyncio.Future[None] = self.loop.create_future()
        self._close_exc: Exception | None = None
        self.rebinds = 0  # how many times the local socket was swapped
        self.on_stream: Any = None  # optional callback(QuicStream) for server-initiated streams
        self._paused: set[QuicStream] = set()  # streams whose protocol we paused

    @property
    def remote_addr(self) -> tuple[Any, ...]:
        return self._remote

    # -- life cycle ------------------------------------------------------------------------

    @classmethod
    async def connect(cls, host: str, port: int, alpn: str = "mqtt", verify: bool = False,
                      cafile: str | None = None, local_host: str | None = None,
                      server_name: str | None = None, timeout: float = DEFAULT_CONNECT_TIMEOUT,
                      idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> QuicStreamClient:
        """Open a UDP socket, run the QUIC/TLS 1.3 handshake, return the connected client.

        ``verify=False`` is EMQX's common client default (servers use self-signed
        certificates); giving ``cafile`` turns verification on.
        """
        config = QuicConfiguration(is_client=True, alpn_protocols=[alpn],
                                   idle_timeout=idle_timeout,
                                   server_name=server_name or host)
        if cafile:
            config.load_verify_locations(cafile)
            config.verify_mode = ssl.CERT_REQUIRED
        elif not verify:
            config.verify_mode = ssl.CERT_NONE
        self = cls(host, port, config, local_host)
        # Resolve once: QUIC addresses the peer by IP, and the path must not change under us.
        infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        self._remote = infos[0][4][:2]
        await self._open_socket(local_host)
        self.quic.connect(self._remote, now=self.loop.time())
        self._transmit()
        try:
            await asyncio.wait_for(asyncio.shield(self._handshake), timeout)
        except asyncio.TimeoutError:
            self._abort_local(QuicConnectError(f"QUIC handshake with {host}:{port} timed out"))
            raise QuicConnectError(f"QUIC handshake with {host}:{port} timed out") from None
        except BaseException:
            self._abort_local(QuicConnectError("connect cancelled or failed"))
            raise
        return self

    async def _open_socket(self, local_host: str | None) -> None:
        family = socket.AF_INET6 if ":" in self._remote[0] else socket.AF_INET
        bind_host = local_host or ("::" if family == socket.AF_INET6 else "0.0.0.0")
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((bind_host, 0))
            sock.setblocking(False)
            # Not connect()ed: QUIC itself checks where datagrams come from (a server may
            # answer from a preferred address), and rebind() closes the old socket anyway.
            _, proto = await self.loop.create_datagram_endpoint(lambda: _Datagrams(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        old = self._udp
        self._udp = proto  # type: ignore[assignment]
        self.local_addr = sock.getsockname()
        if old is not None and old.transport is not None:
            old.transport.close()

    async def rebind(self, local_host: str | None = None) -> tuple[Any, ...]:
        """Send from a fresh UDP socket on a new local port (and ``local_host``, e.g. another
        127.0.0.x) from now on, as a client whose address changed. Returns the new local
        address. The connection, its streams and its connection ids stay the same; the server
        sees the new path, validates it, and answers there."""
        await self._open_socket(local_host if local_host is not None else self._local_host)
        self.rebinds += 1
        # Send something right away (a PING) so the server learns the new path now, not at the
        # next application write: that is what a real client's next packet would do.
        if self.quic._state not in (QuicConnectionState.CLOSING, QuicConnectionState.DRAINING,
                                    QuicConnectionState.TERMINATED):
            self.quic.send_ping(uid=self.rebinds)
            self._transmit()
        assert self.local_addr is not None
        return self.local_addr

    def change_connection_id(self) -> None:
        """Switch to the next connection id the server issued (what MsQuic does when idle)."""
        self.quic.change_connection_id()
        self._transmit()

    def open_stream(self, protocol: asyncio.Protocol | None = None) -> QuicStream:
        """A new client-initiated bidirectional stream (ids 0, 4, 8, ...)."""
        if self._closed.done():
            raise ConnectionError("QUIC connection is closed")
        stream_id = self.quic.get_next_available_stream_id()
        stream = QuicStream(self, stream_id)
        self.streams[stream_id] = stream
        if protocol is not None:
            stream.set_protocol(protocol)
        return stream

    def close(self, error_code: int = 0, reason: str = "") -> None:
        """Close the connection (CONNECTION_CLOSE); streams hear connection_lost."""
        if self._closed.done():
            return
        # Send what the streams still hold (an MQTT DISCONNECT) before CONNECTION_CLOSE.
        self._transmit()
        self.quic.close(error_code=error_code, reason_phrase=reason)
        self._transmit()
        # Closing state lasts ~3 PTO in aioquic; we do not wait for the server to confirm.
        self._terminate(None)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def is_closed(self) -> bool:
        return self._closed.done()

    # -- the sans-IO driver --------------------------------------------------------------

    def _datagram_received(self, udp: _Datagrams, data: bytes, addr: tuple[Any, ...]) -> None:
        if udp is not self._udp or self._closed.done():
            return  # a late datagram on a socket we rebound away from
        self.quic.receive_datagram(data, addr[:2], now=self.loop.time())
        self._process_events()
        self._transmit()
        if self._paused:  # acknowledgements may have drained a paused stream's buffer
            for stream in [st for st in self._paused if st._maybe_resume()]:
                self._paused.discard(stream)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._closed.done():
            return
        self.quic.handle_timer(now=self.loop.time())
        self._process_events()
        self._transmit()

    def _transmit(self) -> None:
        udp = self._udp
        if udp is not None and udp.transport is not None and not udp.transport.is_closing():
            for data, addr in self.quic.datagrams_to_send(now=self.loop.time()):
                udp.transport.sendto(data, addr)
        if self._closed.done():
            return
        at = self.quic.get_timer()
        if at != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_at = at
            if at is not None:
                self._timer = self.loop.call_at(at, self._on_timer)

    def _process_events(self) -> None:
        event: QuicEvent | None = self.quic.next_event()
        while event is not None:
            if isinstance(event, StreamDataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is None:
                    stream = QuicStream(self, event.stream_id)
                    self.streams[event.stream_id] = stream
                    if self.on_stream is not None:
                        self.on_stream(stream)
                stream._data(event.data, event.end_stream)
            elif isinstance(event, StreamReset):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream._finish(ConnectionResetError(
                        f"QUIC stream {event.stream_id} reset by peer (code {event.error_code})"))
            elif isinstance(event, HandshakeCompleted):
                if not self._handshake.done():
                    self._handshake.set_result(None)
            elif isinstance(event, ConnectionTerminated):
                exc = None if event.error_code == 0 else ConnectionError(
                    f"QUIC connection closed (code {event.error_code}: {event.reason_phrase})")
                if not self._handshake.done():
                    self._handshake.set_exception(QuicConnectError(
                        f"QUIC handshake failed (code {event.error_code}: {event.reason_phrase})"))
                self._terminate(exc or ConnectionResetError("QUIC connection closed by peer"))
                return
            event = self.quic.next_event()

    def _send(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        if self._closed.done():
            return
        self.quic.send_stream_data(stream_id, data, end_stream=end_stream)
        # Coalesce: many writes in one loop turn become one flight of datagrams.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    _flush_scheduled = False

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._transmit()

    def _reset(self, stream_id: int) -> None:
        if self._closed.done():
            return
        try:
            self.quic.reset_stream(stream_id, error_code=0)
        except Exception:  # the stream may already be finished on our side
            return
        self._transmit()

    def _abort_local(self, exc: Exception) -> None:
        self._terminate(exc)

    def _terminate(self, exc: Exception | None) -> None:
        if self._closed.done():
            return
        self._close_exc = exc
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._closed.set_result(None)
        if not self._handshake.done():
            self._handshake.set_exception(exc or QuicConnectError("closed before the handshake"))
            self._handshake.exception()  # retrieved: connect() reports it
        for stream in list(self.streams.values()):
            stream._finish(exc)
        udp = self._udp
        if udp is not None and udp.transport is not None:
            # Let the final CONNECTION_CLOSE datagram leave before the socket goes.
            self.loop.call_soon(udp.transport.close)
