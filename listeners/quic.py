"""QUIC server endpoint: one UDP socket of a shard, its QUIC connections, their streams as pipes.

Knows nothing of MQTT. It follows EMQX 5's stream conventions, which are about streams, not
MQTT: the first client-initiated bidirectional stream of a connection is its *control* stream,
later ones are *data* streams, and the control stream's end is the connection's end. The
application gets each stream as an asyncio transport (:class:`QuicStream`) and answers with a
protocol for it, exactly as for a TCP connection.

Steering across N shards sharing one UDP port (SO_REUSEPORT group bound in a fixed order):

* every connection id this endpoint issues has ``cid[0] % count == index``
  (:class:`TaggedQuicConnection`), including the ids handed out later in NEW_CONNECTION_ID
  frames and the Retry source id;
* :func:`attach_steering` attaches a classic BPF program to the group that returns
  ``dcid[0] % count``, the socket index of the owner, so a datagram from a client whose address
  changed still reaches the shard holding its connection;
* a short-header datagram whose id belongs to another shard (the program could not be
  attached) goes to ``forward(owner, pack_forward(data, addr))``, which hands it to the owner over the bus;
  the owner answers from its own member of the group, which has the same address.

aioquic (pinned in setup.cfg) has no hook for choosing connection ids; the subclass re-tags
the ids it generates, touching ``_host_cids`` and friends, and tests/unit/test_quic_tagging.py
fails if a new aioquic version moves them.

Cost per datagram: one dict lookup by destination id, aioquic's own processing, and the
connection's datagrams are sent once per loop turn however many streams wrote to it.
"""

from __future__ import annotations

import asyncio
import ctypes
import datetime
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.packet import (
    QuicPacketType, encode_quic_retry, encode_quic_version_negotiation, pull_quic_header,
)
from aioquic.quic.retry import QuicRetryTokenHandler

log = logging.getLogger("shoal.quic")

ALPN = "mqtt"
CID_LENGTH = 8
# EMQX's connection close codes (application errors)
CLOSE_OK = 0
CLOSE_CONTROL_STREAM = 1
CLOSE_OVERLOADED = 2
# A stream whose unacknowledged output passes this tells its protocol to pause writing
# (QoS 0 is then dropped and QoS 1/2 waits in the session, as on a full TCP socket).
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
# After the application closes a connection's control stream, its last bytes (a CONNACK
# refusal, a DISCONNECT) get this long to be acknowledged before the connection is closed.
CLOSE_GRACE = 2.0
# Bytes of data streams kept while their connection's control stream has not begun (packets
# reordered on the way); more is not reordering but abuse.
EARLY_LIMIT = 256 * 1024

SO_ATTACH_REUSEPORT_CBPF = 51


# -- connection ids -------------------------------------------------------------------------

def tagged_cid(index: int, count: int, length: int = CID_LENGTH) -> bytes:
    """A random connection id whose first byte is ``index`` modulo ``count``."""
    raw = bytearray(os.urandom(length))
    # the largest multiple of count that fits a byte keeps byte0 uniform over its class
    span = 256 - 256 % count
    raw[0] = (raw[0] % (span // count)) * count + index
    return bytes(raw)


def owner_of(cid: bytes, count: int) -> int:
    return cid[0] % count if cid else 0


class TaggedQuicConnection(QuicConnection):
    """A server connection whose every issued connection id routes back to shard ``index``."""

    def __init__(self, *, index: int, count: int, **kwargs: Any) -> None:
        self._tag_index = index
        self._tag_count = count
        super().__init__(**kwargs)
        first = self._host_cids[0]
        first.cid = tagged_cid(index, count, len(first.cid))
        self.host_cid = first.cid
        self._local_initial_source_connection_id = first.cid

    def _replenish_connection_ids(self) -> None:
        before = len(self._host_cids)
        super()._replenish_connection_ids()
        for entry in self._host_cids[before:]:
            entry.cid = tagged_cid(self._tag_index, self._tag_count, len(entry.cid))


# -- steering --------------------------------------------------------------------------------

class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def steering_program(count: int) -> list[tuple[int, int, int, int]]:
    """Classic BPF: the group index of a datagram is its destination connection id's first
    byte modulo ``count``. The program sees the UDP payload from byte 0; the id starts at byte
    1 of a short header and byte 6 of a long one (1 flags + 4 version + 1 length). A load
    past the end returns 0 (socket 0), an index past the group falls back to the hash."""
    return [
        (0x30, 0, 0, 0),       # ldb [0]              first byte: header form
        (0x45, 2, 0, 0x80),    # jset #0x80, L, S     long header?
        (0x30, 0, 0, 1),       # S: ldb [1]           short: dcid[0]
        (0x05, 0, 0, 1),       # ja M
        (0x30, 0, 0, 6),       # L: ldb [6]           long: dcid[0]
        (0x94, 0, 0, count),   # M: mod #count
        (0x16, 0, 0, 0),       # ret a
    ]


def attach_steering(sock: socket.socket, count: int) -> None:
    """Attach the steering program to the SO_REUSEPORT group ``sock`` belongs to.
    Raises OSError where the kernel refuses it."""
    prog = steering_program(count)
    filters = (_SockFilter * len(prog))(*[_SockFilter(*ins) for ins in prog])
    fprog = _SockFprog(len(prog), filters)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF,
                    ctypes.string_at(ctypes.addressof(fprog), ctypes.sizeof(fprog)))


def make_udp_group(host: str, port: int, n: int) -> list[socket.socket]:
    """N UDP sockets on one address with SO_REUSEPORT, bound in order: a steering program's
    return value k picks the k-th. Whoever holds them keeps them open, since closing one
    moves the last into its slot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            # a burst of handshakes must not overflow the default ~200 kB receive queue
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            except OSError:
                pass
            sock.bind((host, port))
            port = sock.getsockname()[1]  # port 0: the rest join the one the kernel chose
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


# -- certificates ------------------------------------------------------------------------------

def ensure_self_signed(directory: str, hostname: str | None = None) -> tuple[str, str]:
    """(certfile, keyfile) of a self-signed certificate kept in ``directory``, made once."""
    cert_path = os.path.join(directory, "quic-selfsigned.crt")
    key_path = os.path.join(directory, "quic-selfsigned.key")
    if os.path.exists(cert_path) and os.path.exists(key_path):
        return cert_path, key_path
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    name = hostname or socket.gethostname() or "localhost"
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(name), x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    os.makedirs(directory, exist_ok=True)
    # written under temporary names and renamed, so a concurrent reader sees both or neither
    tmp_key, tmp_cert = key_path + f".{os.getpid()}.tmp", cert_path + f".{os.getpid()}.tmp"
    fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(tmp_cert, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp_key, key_path)
    os.replace(tmp_cert, cert_path)
    return cert_path, key_path


def server_configuration(certfile: str, keyfile: str, idle_timeout: float) -> QuicConfiguration:
    config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN],
                               idle_timeout=idle_timeout, connection_id_length=CID_LENGTH)
    # one control stream plus the data streams
    config.max_stream_data = 1024 * 1024
    config.max_data = 4 * 1024 * 1024
    config.load_cert_chain(certfile, keyfile or None)
    return config


# -- streams as transports ---------------------------------------------------------------------

class QuicStream(asyncio.Transport):
    """One bidirectional stream, seen by the application as a connected byte pipe."""

    def __init__(self, conn: ServerConnection, stream_id: int) -> None:
        super().__init__()
        self.conn = conn
        self.stream_id = stream_id
        self.protocol: asyncio.Protocol | None = None
        self._closing = False
        self._reading = True
        self._held: list[tuple[bytes, bool]] = []  # what arrived while reading was paused
        self._write_paused = False
        self._unacked_start = 0

    # transport side (the application calls these)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        conn = self.conn
        if self._closing or conn.closed:
            return
        try:
            conn.quic.send_stream_data(self.stream_id, bytes(data))
        except (ValueError, RuntimeError):
            # the client stopped or reset the stream (STOP_SENDING): nothing more goes on it
            self._closing = True
            return
        conn.endpoint.mark(conn)
        if not self._write_paused and self.get_write_buffer_size() > WRITE_HIGH_WATER:
            self._write_paused = True
            if self.protocol is not None:
                self.protocol.pause_writing()

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if not self._closing and not self.conn.closed:
            try:
                self.conn.quic.send_stream_data(self.stream_id, b"", end_stream=True)
            except (ValueError, RuntimeError):
                return  # already stopped or reset by the client
            self.conn.endpoint.mark(self.conn)

    def close(self) -> None:
        """End the stream after what was written; ending the control stream ends the
        connection once its last bytes are acknowledged (or CLOSE_GRACE passes)."""
        if self._closing:
            return
        self.write_eof()
        self._closing = True
        self.conn.stream_closed_by_app(self)

    def abort(self) -> None:
        """Drop the stream now; aborting the control stream closes the connection at once
        (code 2, overloaded: the application refuses it, e.g. a connection limit)."""
        if self._closing:
            return
        self._closing = True
        conn = self.conn
        if self is conn.control:
            conn.close(CLOSE_OVERLOADED, "refused")
        elif not conn.closed:
            try:
                conn.quic.reset_stream(self.stream_id, 0)
            except Exception:  # already finished or reset: nothing left to drop
                pass
            conn.endpoint.mark(conn)
        conn.stream_closed_by_app(self)

    def is_closing(self) -> bool:
        return self._closing or self.conn.closed

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if self._reading:
            return
        self._reading = True
        held, self._held = self._held, []
        for data, end in held:
            self._deliver(data, end)
            if not self._reading:
                break

    def is_reading(self) -> bool:
        return self._reading

    def get_write_buffer_size(self) -> int:
        stream = self.conn.quic._streams.get(self.stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return sender._buffer_stop - sender._buffer_start

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # fixed water marks: WRITE_HIGH_WATER / WRITE_LOW_WATER

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.conn.peer
        if name == "sockname":
            return self.conn.endpoint.sockname
        if name == "stream_id":
            return self.stream_id
        if name == "quic":
            return self.conn
        return default

    # endpoint side

    def _deliver(self, data: bytes, end: bool) -> None:
        protocol = self.protocol
        if protocol is None:
            return
        if not self._reading:
            # QUIC flow control bounds what a peer can send ahead of us (max_stream_data)
            self._held.append((data, end))
            return
        if data:
            protocol.data_received(data)
        if end and not self._closing:
            keep = protocol.eof_received()
            if not keep:
                self.close()

    def _check_write_resume(self) -> None:
        if self._write_paused and self.get_write_buffer_size() <= WRITE_LOW_WATER:
            self._write_paused = False
            if self.protocol is not None:
                self.protocol.resume_writing()

    def _lost(self, exc: Exception | None) -> None:
        protocol, self.protocol = self.protocol, None
        self._closing = True
        if protocol is not None:
            protocol.connection_lost(exc)


class ConnectionApp:
    """What the application does with one QUIC connection's streams (override)."""

    def control_stream(self, stream: QuicStream) -> asyncio.Protocol:
        raise NotImplementedError

    def data_stream(self, stream: QuicStream) -> asyncio.Protocol | None:
        """A protocol for a data stream, or None to refuse it (the stream is reset)."""
        return None


class ServerConnection:
    """One QUIC connection: the aioquic state machine, its timer, its streams."""

    __slots__ = ("endpoint", "quic", "app", "control", "streams", "ended", "early", "early_bytes",
                 "cids", "closed", "peer", "_timer", "_timer_at", "_close_timer")

    def __init__(self, endpoint: Endpoint, quic: TaggedQuicConnection, app: ConnectionApp,
                 peer: NetworkAddress) -> None:
        self.endpoint = endpoint
        self.quic = quic
        self.app = app
        self.control: QuicStream | None = None
        self.streams: dict[int, QuicStream] = {}
        self.ended: set[int] = set()  # data streams the application closed: ignore the rest
        self.early: list[events.StreamDataReceived] = []
        self.early_bytes = 0
        self.cids: set[bytes] = set()
        self.closed = False
        self.peer = peer
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._close_timer: asyncio.TimerHandle | None = None

    def close(self, code: int, reason: str = "") -> None:
        if self.closed:
            return
        self.quic.close(error_code=code, reason_phrase=reason)
        self.endpoint.mark(self)

    def stream_closed_by_app(self, stream: QuicStream) -> None:
        if stream is not self.control:
            if self.streams.pop(stream.stream_id, None) is not None:
                self.ended.add(stream.stream_id)
            return
        if self._close_timer is None and not self.closed:
            self._close_timer = self.endpoint.loop.call_later(
                CLOSE_GRACE, self.close, CLOSE_OK, "")

    def _control_flushed(self) -> bool:
        control = self.control
        if control is None:
            return True
        stream = self.quic._streams.get(control.stream_id)
        return stream is None or stream.sender.is_finished

    def handle_events(self) -> None:
        quic = self.quic
        endpoint = self.endpoint
        event = quic.next_event()
        while event is not None:
            kind = type(event)
            if kind is events.StreamDataReceived:
                self._stream_data(event)  # type: ignore[arg-type]
            elif kind is events.ConnectionIdIssued:
                cid = event.connection_id  # type: ignore[attr-defined]
                self.cids.add(cid)
                endpoint.connections[cid] = self
            elif kind is events.ConnectionIdRetired:
                cid = event.connection_id  # type: ignore[attr-defined]
                self.cids.discard(cid)
                if endpoint.connections.get(cid) is self:
                    del endpoint.connections[cid]
            elif kind is events.StreamReset:
                stream = self.streams.pop(event.stream_id, None)  # type: ignore[attr-defined]
                if stream is not None:
                    stream._lost(ConnectionResetError("stream reset by the client"))
                    if stream is self.control:
                        self.close(CLOSE_CONTROL_STREAM, "control stream reset")
            elif kind is events.ConnectionTerminated:
                self._terminated()
                return
            event = quic.next_event()
        if self._close_timer is not None and self._control_flushed():
            self.close(CLOSE_OK)
        for stream in self.streams.values():
            if stream._write_paused:
                stream._check_write_resume()
        peer = quic._network_paths[0].addr if quic._network_paths else None
        if peer is not None and peer != self.peer:
            log.debug("QUIC connection moved from %s to %s", self.peer, peer)
            self.peer = peer

    def _stream_data(self, event: events.StreamDataReceived) -> None:
        sid = event.stream_id
        stream = self.streams.get(sid)
        if stream is None:
            if sid & 3 != 0 or sid in self.ended:
                return  # only client-initiated bidirectional streams carry MQTT
            if sid == 0:
                # the first client bidi stream is the control stream, whatever arrives first
                stream = self.control = QuicStream(self, sid)
                self.streams[sid] = stream
                protocol: asyncio.Protocol | None = self.app.control_stream(stream)
            elif self.control is None:
                # a data stream overtook the control stream's first packet: keep it for then
                self.early.append(event)
                self.early_bytes += len(event.data)
                if self.early_bytes > EARLY_LIMIT:
                    self.close(CLOSE_OVERLOADED, "data streams before the control stream")
                return
            else:
                protocol = None
                if len(self.streams) <= self.endpoint.max_data_streams:
                    stream = QuicStream(self, sid)
                    self.streams[sid] = stream
                    protocol = self.app.data_stream(stream)
                if protocol is None:
                    self.streams.pop(sid, None)
                    self.ended.add(sid)
                    self.quic.reset_stream(sid, 0)
                    self.quic.stop_stream(sid, 0)
                    return
            assert stream is not None
            stream.protocol = protocol
            protocol.connection_made(stream)
            if stream._closing:
                return  # refused in connection_made
        stream._deliver(event.data, event.end_stream)
        if stream is self.control:
            if event.end_stream and not self.closed:
                # the client ended its control stream: that is the end of the connection
                self.close(CLOSE_OK)
            elif self.early:
                early, self.early = self.early, []
                self.early_bytes = 0
                for held in early:
                    self._stream_data(held)

    def _terminated(self) -> None:
        if self.closed:
            return
        self.closed = True
        endpoint = self.endpoint
        for cid in self.cids:
            if endpoint.connections.get(cid) is self:
                del endpoint.connections[cid]
        self.cids.clear()
        for timer in (self._timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._close_timer = None
        streams, self.streams = self.streams, {}
        # data streams first: the control stream's loss ends the MQTT connection
        for stream in sorted(streams.values(), key=lambda s: s is self.control):
            stream._lost(None)
        endpoint.gone(self)

    def on_timer(self) -> None:
        self._timer = None
        now = max(self._timer_at or 0.0, self.endpoint.loop.time())
        self._timer_at = None
        self.quic.handle_timer(now)
        self.handle_events()
        self.endpoint.mark(self)

    def transmit(self, sendto: Callable[[bytes, NetworkAddress], Any], now: float) -> int:
        sent = 0
        for data, addr in self.quic.datagrams_to_send(now=now):
            try:
                sendto(data, addr)
            except OSError:
                pass  # a full socket buffer or an unreachable peer: QUIC retransmits
            sent += 1
        # (a connection's end is an event: every call that can end it, receive_datagram
        # and handle_timer, is followed by handle_events, which sees ConnectionTerminated)
        quic = self.quic
        timer_at = quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None and not self.closed:
            self._timer = self.endpoint.loop.call_at(timer_at, self.on_timer)
        self._timer_at = timer_at
        return sent


class Endpoint(asyncio.DatagramProtocol):
    """The QUIC side of one UDP socket of a shard (member ``index`` of a group of ``count``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, configuration: QuicConfiguration,
                 new_app: Callable[[ServerConnection], ConnectionApp], *, index: int = 0,
                 count: int = 1, max_data_streams: int = 10, retry: bool = False,
                 forward: Callable[[int, bytes], None] | None = None,
                 max_live: int = 0) -> None:
        self.loop = loop
        self.configuration = configuration
        self.new_app = new_app
        self.index = index
        self.count = count
        self.max_data_streams = max_data_streams
        self.forward = forward
        self.retry = QuicRetryTokenHandler() if retry else None
        self.connections: dict[bytes, ServerConnection] = {}
        self.live: set[ServerConnection] = set()
        self.transport: asyncio.DatagramTransport | None = None
        self.sockname: Any = None
        self._dirty: list[ServerConnection] = []
        self._scheduled = False
        self.forwarded = 0
        self.dropped = 0
        self.accepting = True
        # QUIC connections (handshakes included) this endpoint holds at most: a flood of
        # Initials must not grow state past what the connection limit would admit anyway
        self.max_live = max_live

    # -- asyncio.DatagramProtocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.sockname = transport.get_extra_info("sockname")

    def datagram_received(self, data: bytes, addr: NetworkAddress) -> None:
        self.receive(data, addr, forwarded=False)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors for one peer say nothing about the others

    # -- datagrams ------------------------------------------------------------------------

    def receive(self, data: bytes, addr: NetworkAddress, forwarded: bool) -> None:
        """A datagram from ``addr``, read from our socket or forwarded by another shard."""
        first = data[0] if data else 0
        if first & 0x80 == 0:
            # short header: the destination id is all we need, and it is ours or a sibling's
            cid = data[1:1 + CID_LENGTH]
            conn = self.connections.get(cid)
            if conn is None:
                self._misrouted(cid, data, addr, forwarded)
                return
            self._into(conn, data, addr)
            return
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except ValueError:
            self.dropped += 1
            return
        if (header.packet_type != QuicPacketType.VERSION_NEGOTIATION
                and header.version is not None
                and header.version not in self.configuration.supported_versions):
            self._send(encode_quic_version_negotiation(
                source_cid=header.destination_cid, destination_cid=header.source_cid,
                supported_versions=self.configuration.supported_versions), addr)
            return
        conn = self.connections.get(header.destination_cid)
        if conn is not None:
            self._into(conn, data, addr)
            return
        if header.packet_type != QuicPacketType.INITIAL or len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
            self._misrouted(header.destination_cid, data, addr, forwarded)
            return
        self._accept(header, data, addr)

    def _misrouted(self, cid: bytes, data: bytes, addr: NetworkAddress, forwarded: bool) -> None:
        owner = owner_of(cid, self.count)
        if owner != self.index and not forwarded and self.forward is not None:
            self.forwarded += 1
            self.forward(owner, pack_forward(data, addr))
        else:
            self.dropped += 1  # an id nobody holds (a connection that ended): ignore

    def _accept(self, header: Any, data: bytes, addr: NetworkAddress) -> None:
        if not self.accepting or (self.max_live and len(self.live) >= self.max_live):
            self.dropped += 1
            return
        odcid = header.destination_cid
        retry_scid = None
        if self.retry is not None:
            if not header.token:
                # the client's next Initial is addressed to this id, so it comes back to us
                scid = tagged_cid(self.index, self.count)
                self._send(encode_quic_retry(
                    version=header.version, source_cid=scid,
                    destination_cid=header.source_cid, original_destination_cid=odcid,
                    retry_token=self.retry.create_token(
                        address=addr, original_destination_connection_id=odcid,
                        retry_source_connection_id=scid, now=self.loop.time())), addr)
                return
            try:
                odcid = self.retry.validate_token(address=addr, destination_cid=odcid,
                                                  token=header.token, now=self.loop.time())
                retry_scid = header.destination_cid
            except ValueError:
                self.dropped += 1
                return
        quic = TaggedQuicConnection(
            index=self.index, count=self.count, configuration=self.configuration,
            original_destination_connection_id=odcid,
            retry_source_connection_id=retry_scid)
        conn = ServerConnection(self, quic, None, addr)  # type: ignore[arg-type]
        conn.app = self.new_app(conn)
        self.live.add(conn)
        for cid in (header.destination_cid, quic.host_cid):
            conn.cids.add(cid)
            self.connections[cid] = conn
        self._into(conn, data, addr)

    def _into(self, conn: ServerConnection, data: bytes, addr: NetworkAddress) -> None:
        conn.quic.receive_datagram(data, addr, now=self.loop.time())
        conn.handle_events()
        self.mark(conn)

    def _send(self, data: bytes, addr: NetworkAddress) -> None:
        if self.transport is not None:
            try:
                self.transport.sendto(data, addr)
            except OSError:
                pass

    # -- output, once per loop turn -----------------------------------------------------

    def mark(self, conn: ServerConnection) -> None:
        self._dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        transport = self.transport
        if transport is None:
            return
        sendto = transport.sendto
        now = self.loop.time()
        seen: set[int] = set()
        for conn in dirty:
            key = id(conn)
            if key in seen:
                continue
            seen.add(key)
            conn.transmit(sendto, now)

    def gone(self, conn: ServerConnection) -> None:
        self.live.discard(conn)

    def close(self, code: int = CLOSE_OK, reason: str = "") -> None:
        """Close every connection (a shard shutting down) and flush their CONNECTION_CLOSE."""
        for conn in list(self.live):
            conn.close(code, reason)
        self.flush()
        for conn in list(self.live):
            conn._terminated()


async def serve(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                endpoint: Endpoint) -> asyncio.DatagramTransport:
    sock.setblocking(False)
    transport, _ = await loop.create_datagram_endpoint(lambda: endpoint, sock=sock)
    return transport  # type: ignore[return-value]


def pack_forward(data: bytes, addr: NetworkAddress) -> bytes:
    """A misrouted datagram with its sender's address, for the bus."""
    host = addr[0].encode()
    return struct.pack(">BH", len(host), addr[1]) + host + data


def unpack_forward(blob: bytes) -> tuple[bytes, NetworkAddress]:
    n, port = struct.unpack_from(">BH", blob)
    host = blob[3:3 + n].decode()
    return blob[3 + n:], (host, port)
