"""MQTT over a QUIC connection, in EMQX 5's single- and multi-stream modes.

The control stream (the connection's first client stream) is a :class:`QuicLink`: the same
Link a TCP connection is, so CONNECT, sessions, takeover, wills and routing are the TCP code.
Data streams (later client streams) are :class:`DataStream` inputs of that same MQTT
connection: their packets share its state (aliases, receive maximum, keepalive) but answers
go back where the request came from:

* a PUBLISH's PUBACK/PUBREC (also when decided later, see ``MQTTConnection.reserve_ack``), a
  SUBSCRIBE's SUBACK, an UNSUBSCRIBE's UNSUBACK, a PUBREC's PUBREL go out on the stream that
  carried the packet;
* deliveries for a subscription made on a data stream go out on that stream (the most recent
  matching SUBSCRIBE wins; once its stream ends they fall back to the control stream);
* CONNACK, PINGRESP and DISCONNECT only ever go on the control stream;
* data streams are read only once the CONNECT is accepted (buffered until then, bounded);
* traffic on any stream counts for the MQTT keepalive.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from listeners.quic import (
    ConnectionApp, Endpoint, QuicStream, ServerConnection, serve, server_configuration,
    unpack_forward,
)
from shards.hostlink import RouterHost
from shards.listening import quic_cert
from shards.protocol.connection import CONNECTED
from shards.protocol.errors import ProtocolError, Reason
from shards.protocol.packets import (
    AUTH, DISCONNECT, PINGREQ, PUBLISH, SUBSCRIBE, UNSUBSCRIBE, Packet,
)
from shards.protocol.reader import FrameReader
from shards.protocol.topics import matches, parse_shared
from shards.worker import ClientProtocol, Worker

log = logging.getLogger("shoal.quic")

# Packets whose answer (if any) belongs to the control stream wherever they arrive.
_CONTROL_ONLY = frozenset({PINGREQ, DISCONNECT, AUTH})


class DataStream(asyncio.Protocol):
    """One data stream: an input of the link's MQTT connection and an output of its own."""

    __slots__ = ("link", "transport", "reader", "out", "open")

    def __init__(self, link: QuicLink) -> None:
        self.link = link
        self.transport: QuicStream | None = None
        self.reader = FrameReader(link.conn.reader.max_packet_size)
        self.out: list[bytes] = []
        self.open = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.link.data.append(self)
        if self.link.worker.input_paused or self.link.throttled:
            self.transport.pause_reading()  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        link = self.link
        conn = link.conn
        now = link.worker.loop.time()
        link.worker.bytes_in += len(data)
        conn.last_rx = now  # keepalive counts every stream's traffic
        self.reader.feed(data)
        if conn.state == CONNECTED:
            link.process_stream(self, now)
        elif self.reader.buffered() > conn.reader.max_packet_size:
            # before CONNACK a data stream may hold a packet's worth, not an unbounded queue
            link.fail_now(ProtocolError(Reason.QUOTA_EXCEEDED,
                                        "data stream traffic before the CONNECT was accepted"))

    def eof_received(self) -> bool:
        self.close()
        return True

    def close(self) -> None:
        if not self.open:
            return
        self.open = False
        self.link.stream_ended(self)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.open:
            self.open = False
            self.link.stream_ended(self)

    def pause_writing(self) -> None:
        self.link.pause_writing()

    def resume_writing(self) -> None:
        self.link.resume_writing()


class QuicLink(ClientProtocol):
    """The control stream of an MQTT-over-QUIC connection; the session's Link."""

    __slots__ = ("data", "routes")
    multi = True

    def __init__(self, worker: Worker) -> None:
        super().__init__(worker, listener="quic")
        self.data: list[DataStream] = []
        # (filter, stream) of subscriptions made on data streams, oldest first
        self.routes: list[tuple[str, DataStream]] = []

    def process(self, now: float) -> None:
        super().process(now)
        if self.data and self.conn.state == CONNECTED and not self._closing:
            for stream in list(self.data):
                if self.throttled or self._closing:
                    break
                self.process_stream(stream, now)

    def process_stream(self, stream: DataStream, now: float) -> None:
        """Drain the whole packets of one data stream, answering on that stream."""
        if self._processing or self.throttled or self._closing:
            return  # the drain in progress (or the unthrottle) reaches this stream
        conn = self.conn
        shard = self.worker.shard
        bucket = self.msg_bucket
        control = conn._out
        self._processing = True
        try:
            while True:
                packet = conn.next_packet(stream.reader)
                if packet is None:
                    break
                ptype = packet.type
                if ptype in _CONTROL_ONLY:
                    shard.handle(self, packet, now)
                else:
                    if ptype == SUBSCRIBE or ptype == UNSUBSCRIBE:
                        self._note_route(packet, stream)
                    conn._out = stream.out
                    try:
                        shard.handle(self, packet, now)
                    finally:
                        conn._out = control
                if bucket is not None and ptype == PUBLISH:
                    wait = bucket.take(1.0, now)
                    if wait:
                        self.throttle(wait)
                        break
        except ProtocolError as err:
            conn._out = control
            log.info("protocol error from %s (%r) on QUIC stream %d: 0x%02X %s", self.peer,
                     conn.client_id, stream.transport.stream_id if stream.transport else -1,
                     err.reason, err.message)
            conn.fail(err)
            shard.end_link(self, now)
        finally:
            self._processing = False
        if stream.out or conn.has_output():
            self.wake()

    def fail_now(self, err: ProtocolError) -> None:
        now = self.worker.loop.time()
        log.info("protocol error from %s (%r): 0x%02X %s", self.peer, self.conn.client_id,
                 err.reason, err.message)
        self.conn.fail(err)
        self.worker.shard.end_link(self, now)
        self.wake()

    def _note_route(self, packet: Packet, stream: DataStream) -> None:
        topics = packet.topics  # type: ignore[attr-defined]
        if packet.type == SUBSCRIBE:
            names = [parse_shared(filt)[1] for filt, _ in topics]
            self.routes = [r for r in self.routes if r[0] not in names]
            self.routes.extend((name, stream) for name in names)
        else:
            names = [parse_shared(filt)[1] for filt in topics]
            self.routes = [r for r in self.routes if r[0] not in names]
        self.conn.topic_out = self._route if self.routes else None

    def _route(self, topic: str) -> list[bytes]:
        for filt, stream in reversed(self.routes):
            if matches(filt, topic):
                return stream.out
        return self.conn._out

    def stream_ended(self, stream: DataStream) -> None:
        if stream in self.data:
            self.data.remove(stream)
        if any(s is stream for _, s in self.routes):
            self.routes = [r for r in self.routes if r[1] is not stream]
            self.conn.topic_out = self._route if self.routes else None
        if stream.out:
            stream.out.clear()  # nowhere to go now; QoS 1/2 are re-sent by the session

    def flush_data(self) -> int:
        """Write every data stream's output (the Worker's flush writes the control one)."""
        written = 0
        for stream in self.data:
            out = stream.out
            if out:
                data = out[0] if len(out) == 1 else b"".join(out)
                out.clear()
                transport = stream.transport
                if transport is not None and not transport.is_closing():
                    transport.write(data)
                    written += len(data)
        return written

    def throttle(self, wait: float) -> None:
        if not self.throttled:
            self.pause_reading_all(True)
        super().throttle(wait)

    def unthrottle(self) -> None:
        super().unthrottle()  # drains the control stream and, through process, data streams
        if not self.throttled and not self._closing and not self.worker.input_paused:
            self.pause_reading_all(False)

    def pause_reading_all(self, paused: bool) -> None:
        for stream in self.data:
            transport = stream.transport
            if transport is not None:
                if paused:
                    transport.pause_reading()
                else:
                    transport.resume_reading()


class MqttOverQuic(ConnectionApp):
    """One QUIC connection of a shard: its control stream becomes a QuicLink."""

    __slots__ = ("worker", "link")

    def __init__(self, worker: Worker, conn: ServerConnection) -> None:
        self.worker = worker
        self.link: QuicLink | None = None

    def control_stream(self, stream: QuicStream) -> asyncio.Protocol:
        self.link = QuicLink(self.worker)
        return self.link

    def data_stream(self, stream: QuicStream) -> asyncio.Protocol | None:
        link = self.link
        if link is None or link._closing or not link.admitted:
            return None
        return DataStream(link)


def _state_bound(*limits: int) -> int:
    """QUIC connections a shard holds at most, handshakes and closing ones included: twice
    the tightest connection limit plus some room, so that a connection over the limit still
    completes its handshake and is told (close code 2), while a flood of Initials cannot
    grow state without bound. 0: no limit is set, nothing to derive a bound from."""
    set_ = [n for n in limits if n > 0]
    return 2 * min(set_) + 64 if set_ else 0


class QuicServer:
    """What the worker keeps of a QUIC listener: close() stops accepting new connections
    (the shutdown order then disconnects the existing ones like any other link)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def close(self) -> None:
        self.endpoint.accepting = False


async def serve_quic(worker: Worker, sock: Any) -> QuicServer:
    cfg = worker.cfg
    # aioquic logs three INFO lines per connection; a connection storm must not be a log storm
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("quic").setLevel(logging.WARNING)
    table = cfg.listeners.quic
    certfile, keyfile = quic_cert(cfg)
    configuration = server_configuration(certfile, keyfile, table.idle_timeout)
    host = worker.shard.host
    index, count = 0, 1
    if isinstance(host, RouterHost):
        index, count = host.index, host.workers
    endpoint = Endpoint(worker.loop, configuration, lambda conn: MqttOverQuic(worker, conn),
                        index=index, count=count, max_data_streams=table.max_data_streams,
                        retry=table.retry,
                        max_live=_state_bound(cfg.limits.max_connections, table.max_connections))
    if isinstance(host, RouterHost) and count > 1 and table.steering != "off":
        # a datagram the kernel gave to the wrong shard goes to the owner of its id
        endpoint.forward = host.send_datagram
        host.on_datagram = lambda blob: endpoint.receive(*unpack_forward(blob), forwarded=True)
    await serve(worker.loop, sock, endpoint)
    return QuicServer(endpoint)
