"""A small asyncio MQTT 3.1.1/5.0 client over any byte transport: TCP, TLS, or a QUIC stream.

Used by ``shoal pub``/``shoal sub``, ``shoal bench --quic`` and the tests. It
reuses the broker's sans-IO codec (:mod:`shards.protocol`), so the client and the
broker never disagree about the bytes. QoS 0/1/2 both ways, keepalive pings,
MQTT 5 properties passed through.

As a library::

    from shards.mqttclient import MQTTClient

    c = await MQTTClient.connect_tcp("127.0.0.1", 1883, client_id="a", version=5)
    # or over QUIC (EMQX conventions: ALPN "mqtt", MQTT on the first bidi stream):
    c = await MQTTClient.connect_quic("127.0.0.1", 14567, client_id="b", insecure=True)
    await c.subscribe([("t/#", 1)])          # -> granted reason codes
    await c.publish("t/1", b"hi", qos=2)      # returns once PUBCOMP arrived
    msg = await c.messages.get()              # a shards.protocol.packets.Publish (None: closed)
    await c.quic.rebind("127.0.0.2")          # QUIC only: new local address, same session
    d = c.open_data_stream()                  # QUIC only: PUBLISH/SUBSCRIBE on stream 4, 8...
    await d.publish("t/2", b"x", qos=1)       # its PUBACK comes back on that stream
    await c.disconnect()

Each transport (the TCP connection, or each QUIC stream) is a :class:`Channel`:
an asyncio.Protocol with its own frame reader, its own waiters for acks and its
own ``messages`` queue. Packet ids and QoS 2 receive state belong to the session
(the :class:`MQTTClient`), because the server numbers them per session.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
from typing import Any

from shards.protocol.codec import decode, encode, encode_publish
from shards.protocol.errors import ProtocolError
from shards.protocol.packets import (
    MQTT_5, MQTT_311, Connack, Connect, Disconnect, Packet, Pingreq, Pingresp, Properties,
    Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback, Subscribe, SubOptions, Unsuback,
    Unsubscribe, Will,
)
from shards.protocol.reader import FrameReader

__all__ = ["MQTTClient", "Channel", "MQTTError", "parse_version"]

# A PINGREQ unanswered for this long (or the keepalive, if longer) means the link is dead.
# Not keepalive/2: after an address change the PINGREQ may be what makes the server validate
# the new path, and its answer can take a few round trips plus a retransmission.
PING_TIMEOUT = 5.0

# How long connect() waits for CONNACK and an operation for its ack, unless told otherwise.
# Generous on purpose: a loaded 2-core CI machine with several brokers can stall for seconds.
DEFAULT_TIMEOUT = 30.0


class MQTTError(Exception):
    """The broker refused something (a CONNACK/SUBACK/PUBACK failure code) or the link died."""

    def __init__(self, message: str, reason_code: int = 0x80) -> None:
        super().__init__(message)
        self.reason_code = reason_code


def parse_version(text: str | int) -> int:
    """mosquitto's -V spellings: mqttv311/311/4 -> 4, mqttv5/5 -> 5."""
    t = str(text).lower()
    if t in ("mqttv311", "311", "4", "3.1.1"):
        return MQTT_311
    if t in ("mqttv5", "5", "5.0"):
        return MQTT_5
    raise ValueError(f"unsupported MQTT version {text!r} (mqttv311 or mqttv5)")


class Channel(asyncio.Protocol):
    """One byte transport carrying MQTT for a client: the TCP connection or one QUIC stream."""

    def __init__(self, client: MQTTClient, name: str = "control") -> None:
        self.client = client
        self.name = name
        self.transport: Any = None
        self.reader = FrameReader()
        # Deliveries in arrival order; a None is put when the connection ends, so a reader
        # blocked on get() wakes up instead of waiting forever.
        self.messages: asyncio.Queue[Publish | None] = asyncio.Queue()
        # (packet type we wait for, packet id) -> future of that packet
        self._waiters: dict[tuple[int, int], asyncio.Future[Packet]] = {}
        self._closed: asyncio.Future[Exception | None] = client.loop.create_future()

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        client = self.client
        try:
            while True:
                frame = self.reader.next_frame()
                if frame is None:
                    return
                packet = decode(frame[0], frame[1], client.version)
                client._handle(self, packet)
        except ProtocolError as exc:
            # After a protocol error nothing more is read: drop the link.
            self._fail(MQTTError(f"protocol error from the broker: {exc}", exc.reason))
            client._abort()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionResetError("connection closed"))
        if self is self.client.control:
            self.client._lost(exc)

    # -- sending ----------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise MQTTError("not connected")
        self.transport.write(data)
        self.client._last_sent = self.client.loop.time()

    def _wait(self, ptype: int, packet_id: int) -> asyncio.Future[Packet]:
        fut: asyncio.Future[Packet] = self.client.loop.create_future()
        if self._closed.done():
            fut.set_exception(MQTTError("connection closed"))
        else:
            self._waiters[(ptype, packet_id)] = fut
        return fut

    def _resolve(self, ptype: int, packet_id: int, packet: Packet) -> bool:
        fut = self._waiters.pop((ptype, packet_id), None)
        if fut is None or fut.done():
            return False
        fut.set_result(packet)
        return True

    def _fail(self, exc: Exception) -> None:
        if not self._closed.done():
            self._closed.set_result(exc)
        waiters, self._waiters = self._waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, MQTTError)
                                  else MQTTError(f"connection lost: {exc}"))

    # -- operations -------------------------------------------------------------------------

    async def publish(self, topic: str, payload: bytes = b"", qos: int = 0, retain: bool = False,
                      props: Properties | None = None, timeout: float | None = DEFAULT_TIMEOUT) -> int:
        """Publish; for QoS 1/2 wait for PUBACK / PUBCOMP. Returns the reason code (0 = ok)."""
        client = self.client
        if qos == 0:
            self.send(encode_publish(topic, payload, 0, retain, False, 0, props, client.version))
            return 0
        pid = client._next_id()
        ack = self._wait(4 if qos == 1 else 5, pid)
        self.send(encode_publish(topic, payload, qos, retain, False, pid, props, client.version))
        reply = await asyncio.wait_for(ack, timeout)
        code = getattr(reply, "reason_code", 0)
        if qos == 1 or code >= 0x80:
            return int(code)
        done = self._wait(7, pid)
        self.send(encode(Pubrel(pid), client.version))
        comp = await asyncio.wait_for(done, timeout)
        return int(getattr(comp, "reason_code", 0))

    async def subscribe(self, filters: list[tuple[str, int]] | list[tuple[str, SubOptions]],
                        props: Properties | None = None,
                        timeout: float | None = DEFAULT_TIMEOUT) -> list[int]:
        """Subscribe; returns SUBACK's reason codes (granted QoS, or >= 0x80 for a refusal)."""
        client = self.client
        pid = client._next_id()
        topics = [(f, o if isinstance(o, SubOptions) else SubOptions(qos=int(o))) for f, o in filters]
        ack = self._wait(9, pid)
        self.send(encode(Subscribe(pid, topics, props), client.version))
        reply = await asyncio.wait_for(ack, timeout)
        assert isinstance(reply, Suback)
        return list(reply.reason_codes)

    async def unsubscribe(self, filters: list[str], timeout: float | None = DEFAULT_TIMEOUT) -> list[int]:
        client = self.client
        pid = client._next_id()
        ack = self._wait(11, pid)
        self.send(encode(Unsubscribe(pid, list(filters)), client.version))
        reply = await asyncio.wait_for(ack, timeout)
        assert isinstance(reply, Unsuback)
        return list(reply.reason_codes or [])

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class MQTTClient:
    """One MQTT session over one connection. Build with :meth:`connect_tcp` /
    :meth:`connect_quic`, or attach to any transport with :meth:`start`."""

    def __init__(self, client_id: str = "", version: int = MQTT_311, keepalive: int = 60,
                 clean_start: bool = True, username: str | None = None,
                 password: bytes | str | None = None, will: Will | None = None,
                 connect_props: Properties | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.client_id = client_id
        self.version = version
        self.keepalive = keepalive
        self.clean_start = clean_start
        self.username = username
        self.password = password.encode() if isinstance(password, str) else password
        self.will = will
        self.connect_props = connect_props or {}
        self.control = Channel(self)
        self.channels: list[Channel] = [self.control]
        self.connack: Connack | None = None
        self.connacks = 0  # how many CONNACKs this client object saw (1 unless it reconnected)
        self.quic: Any = None  # the QuicStreamClient when running over QUIC
        self.disconnect_packet: Disconnect | None = None  # a server DISCONNECT (MQTT 5)
        self._ids = itertools.cycle(range(1, 65536))
        self._qos2_in: set[int] = set()  # ids of QoS 2 messages received, not yet released
        self._connack_fut: asyncio.Future[Connack] = self.loop.create_future()
        self._closed: asyncio.Future[None] = self.loop.create_future()
        self._last_sent = self.loop.time()
        self._ping_outstanding = False
        self._ping_sent = 0.0
        self._ping_timer: asyncio.TimerHandle | None = None

    @property
    def messages(self) -> asyncio.Queue[Publish | None]:
        """Deliveries on the control channel (all of them, unless data streams subscribed)."""
        return self.control.messages

    # -- connecting ----------------------------------------------------------------------------

    @classmethod
    async def connect_tcp(cls, host: str | None = None, port: int | None = None,
                          ssl_context: ssl.SSLContext | None = None,
                          timeout: float = DEFAULT_TIMEOUT, local_host: str | None = None,
                          sock: socket.socket | None = None, **kwargs: Any) -> MQTTClient:
        """MQTT over TCP (TLS with ``ssl_context``), or over ``sock``, a TCP socket already
        connected (a test that placed its connection on a chosen shard)."""
        client = cls(**kwargs)
        if sock is not None:
            sock.setblocking(False)
            await client.loop.create_connection(lambda: client.control, sock=sock)
        else:
            if host is None or port is None:
                raise ValueError("connect_tcp needs host and port, or sock")
            local = (local_host, 0) if local_host else None
            await asyncio.wait_for(client.loop.create_connection(
                lambda: client.control, host, port, ssl=ssl_context, local_addr=local,
                server_hostname=host if ssl_context else None), timeout)
        await client._send_connect(timeout)
        return client

    @classmethod
    async def connect_quic(cls, host: str, port: int, insecure: bool = True,
                           cafile: str | None = None, local_host: str | None = None,
                           timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> MQTTClient:
        """MQTT over QUIC the EMQX way: ALPN ``mqtt``, MQTT on the first bidi stream."""
        # listeners/ is the transport layer; imported here so TCP users need not have aioquic.
        from listeners.quicclient import QuicStreamClient

        client = cls(**kwargs)
        quic = await QuicStreamClient.connect(host, port, alpn="mqtt", verify=not insecure,
                                              cafile=cafile, local_host=local_host,
                                              timeout=timeout)
        client.quic = quic
        try:
            quic.open_stream(client.control)
            await client._send_connect(timeout)
        except BaseException:
            quic.close()
            raise
        return client

    async def start(self, timeout: float = DEFAULT_TIMEOUT) -> Connack:
        """CONNECT on a control channel whose transport is already attached."""
        return await self._send_connect(timeout)

    async def _send_connect(self, timeout: float) -> Connack:
        pkt = Connect(client_id=self.client_id, protocol_level=self.version,
                      clean_start=self.clean_start, keepalive=self.keepalive, will=self.will,
                      username=self.username, password=self.password, props=self.connect_props)
        self.control.send(encode(pkt, self.version))
        try:
            connack = await asyncio.wait_for(asyncio.shield(self._connack_fut), timeout)
        except BaseException:
            self._abort()
            raise
        if connack.reason_code:
            self._abort()
            raise MQTTError(f"connection refused: CONNACK 0x{connack.reason_code:02X}",
                            connack.reason_code)
        self._arm_keepalive()
        return connack

    def open_data_stream(self) -> Channel:
        """QUIC multi-stream mode: a new bidi stream for PUBLISH/SUBSCRIBE and their acks."""
        if self.quic is None:
            raise MQTTError("data streams need a QUIC connection")
        ch = Channel(self, name=f"stream-{len(self.channels)}")
        self.quic.open_stream(ch)
        self.channels.append(ch)
        return ch

    # -- operations on the control channel ----------------------------------------------------

    async def publish(self, topic: str, payload: bytes = b"", qos: int = 0, retain: bool = False,
                      props: Properties | None = None, timeout: float | None = DEFAULT_TIMEOUT) -> int:
        return await self.control.publish(topic, payload, qos, retain, props, timeout)

    async def subscribe(self, filters: list[tuple[str, int]] | list[tuple[str, SubOptions]],
                        props: Properties | None = None,
                        timeout: float | None = DEFAULT_TIMEOUT) -> list[int]:
        return await self.control.subscribe(filters, props, timeout)

    async def unsubscribe(self, filters: list[str], timeout: float | None = DEFAULT_TIMEOUT) -> list[int]:
        return await self.control.unsubscribe(filters, timeout)

    async def disconnect(self, reason_code: int = 0) -> None:
        """Send DISCONNECT and close the connection (the whole QUIC connection over QUIC)."""
        try:
            self.control.send(encode(Disconnect(reason_code), self.version))
        except MQTTError:
            pass
        self._abort()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def is_connected(self) -> bool:
        return self.connack is not None and not self._closed.done()

    # -- incoming packets -------------------------------------------------------------------

    def _handle(self, ch: Channel, p: Packet) -> None:
        if isinstance(p, Publish):
            self._on_publish(ch, p)
        elif isinstance(p, Puback):
            ch._resolve(4, p.packet_id, p)
        elif isinstance(p, Pubrec):
            if not ch._resolve(5, p.packet_id, p):
                # A PUBREC we do not wait for (a re-sent one): finish the exchange anyway.
                ch.send(encode(Pubrel(p.packet_id), self.version))
        elif isinstance(p, Pubrel):
            self._qos2_in.discard(p.packet_id)
            ch.send(encode(Pubcomp(p.packet_id), self.version))
        elif isinstance(p, Pubcomp):
            ch._resolve(7, p.packet_id, p)
        elif isinstance(p, Suback):
            ch._resolve(9, p.packet_id, p)
        elif isinstance(p, Unsuback):
            ch._resolve(11, p.packet_id, p)
        elif isinstance(p, Pingresp):
            self._ping_outstanding = False
        elif isinstance(p, Connack):
            self.connacks += 1
            self.connack = p
            if not self._connack_fut.done():
                self._connack_fut.set_result(p)
        elif isinstance(p, Disconnect):
            self.disconnect_packet = p
            self._abort()
        # AUTH and anything else a client does not expect: ignored (no enhanced auth here).

    def _on_publish(self, ch: Channel, p: Publish) -> None:
        if p.qos == 0:
            ch.messages.put_nowait(p)
        elif p.qos == 1:
            ch.messages.put_nowait(p)
            ch.send(encode(Puback(p.packet_id), self.version))
        else:
            # Method B of the spec (4.3.3): deliver on PUBLISH, remember the id until PUBREL,
            # so a re-sent PUBLISH with DUP is not delivered twice.
            if p.packet_id not in self._qos2_in:
                self._qos2_in.add(p.packet_id)
                ch.messages.put_nowait(p)
            ch.send(encode(Pubrec(p.packet_id), self.version))

    # -- keepalive --------------------------------------------------------------------------

    def _arm_keepalive(self) -> None:
        if self.keepalive <= 0 or self._closed.done():
            return
        self._ping_timer = self.loop.call_later(self.keepalive / 2, self._keepalive_tick)

    def _keepalive_tick(self) -> None:
        self._ping_timer = None
        if self._closed.done():
            return
        if self._ping_outstanding:
            if self.loop.time() - self._ping_sent > max(PING_TIMEOUT, self.keepalive):
                self._abort()  # no PINGRESP: the link is dead
                return
            self._arm_keepalive()
            return
        # Ping when we were quiet for half the keepalive: well inside the server's 1.5x
        # allowance, and over QUIC it is also what tells the server our new address after a
        # NAT rebinding while we only receive (a receiver sends nothing until it hears something).
        if self.loop.time() - self._last_sent >= self.keepalive / 2 - 0.01:
            try:
                self.control.send(encode(Pingreq(), self.version))
                self._ping_outstanding = True
                self._ping_sent = self.loop.time()
            except MQTTError:
                return
        self._arm_keepalive()

    def _next_id(self) -> int:
        return next(self._ids)

    # -- teardown -------------------------------------------------------------------------------

    def _abort(self) -> None:
        if self.quic is not None:
            self.quic.close()
        for ch in self.channels:
            ch.close()
        self._lost(None)

    def _lost(self, exc: Exception | None) -> None:
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
        if not self._connack_fut.done():
            self._connack_fut.set_exception(MQTTError(f"connection closed before CONNACK: {exc}"))
            self._connack_fut.exception()
        for ch in self.channels:
            ch._fail(exc or MQTTError("connection closed"))
        if not self._closed.done():
            self._closed.set_result(None)
            for ch in self.channels:
                ch.messages.put_nowait(None)
