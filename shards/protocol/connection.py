"""One MQTT network connection as a sans-IO state machine.

Bytes go in with :meth:`MQTTConnection.receive_data`, packets come out of
:meth:`next_packet`, bytes to write come out of :meth:`data_to_send`, and time
is passed in (``now``), so keepalive is tested as ``handle_timer(t0 + 1.5 * k)``.

The connection owns what the specification scopes to a network connection:
framing and the packet-size limit, protocol version, "CONNECT first and only
once", topic aliases in both directions, the inbound receive maximum, the
client's maximum packet size for what we send, and keepalive. What outlives a
connection (subscriptions, inflight messages, packet ids) is the session's.

States::

    AWAIT_CONNECT --CONNECT--> CONNECTING --accept()--> CONNECTED
          |                     |  ^   |  refuse()              |  fail()/disconnect()
          |        challenge()  v  |   |                        |
          |              AUTHENTICATING (AUTH 0x18 in)          |
          +---------------------+------+------------------------+-----> CLOSED

While CONNECTING, frames after the CONNECT stay buffered: the shard may need
time (a takeover from another shard) before it accepts or refuses.

MQTT 5 enhanced authentication: :meth:`challenge` sends an AUTH 0x18 (Continue
authentication) and waits in AUTHENTICATING, where the client may send only AUTH
0x18 with the same Authentication Method (or DISCONNECT) [MQTT-4.12.0-3/4]; that
AUTH is handed to the shard and the state returns to CONNECTING. The exchange's
own state (``auth``) is the shard's, kept here so it dies with the connection.

Every protocol violation is a :class:`ProtocolError`; :meth:`fail` is the one
place that turns it into a CONNACK (before the session exists) or a DISCONNECT
(after; MQTT 5 only) and closes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from shards.protocol.codec import (
    connect_protocol_level, decode, encode, encode_properties, encode_publish, splice_properties,
    topic_alias_entry,
)
from shards.protocol.errors import ProtocolError, Reason
from shards.protocol.packets import (
    AUTH, CONNACK, Auth, CONNECT, DISCONNECT, MQTT_5, MQTT_31, MQTT_311, PINGRESP, PUBACK, PUBCOMP, PUBLISH, PUBREC,
    SUBACK, UNSUBACK, Connack, Connect, Disconnect, Packet, Prop, Properties, Puback, Publish,
)
from shards.protocol.reader import FrameReader

# PUBACK fast path: the fixed header and high byte of the packet id, then the low byte
_PUBACK_HEADS = [bytes((0x40, 0x02, hi)) for hi in range(256)]
_ONE_BYTE = [bytes((i,)) for i in range(256)]

AWAIT_CONNECT = 0
CONNECTING = 1
CONNECTED = 2
CLOSED = 3
AUTHENTICATING = 4

# Packets only a server sends; a client sending one is a protocol error.
_SERVER_ONLY = frozenset({CONNACK, SUBACK, UNSUBACK, PINGRESP})
# With Request Problem Information = 0 these packets must not carry a reason
# string or user properties [MQTT-3.1.2-29].
_PROBLEM_INFO_EXEMPT = frozenset({CONNACK, PUBLISH, DISCONNECT})
_LEVELS = frozenset({MQTT_31, MQTT_311, MQTT_5})
_PIDS = [i.to_bytes(2, "big") for i in range(256)]
MQTT_MAX_PACKET = 268435460  # 1 + 4 + 268435455


class MQTTConnection:
    __slots__ = (
        "state", "version", "keepalive", "last_rx", "connect_deadline", "reader", "_out",
        "receive_maximum", "_pending_in", "topic_alias_maximum", "_alias_in",
        "client_max_packet", "client_alias_max", "_alias_out", "problem_info", "client_id",
        "_acks", "topic_out", "auth_method", "auth",
    )

    def __init__(self, now: float, *, max_packet_size: int = MQTT_MAX_PACKET,
                 connect_timeout: float = 10.0, receive_maximum: int = 65535,
                 topic_alias_maximum: int = 0) -> None:
        self.state = AWAIT_CONNECT
        self.version = 0
        self.keepalive = 0
        self.last_rx = now
        self.connect_deadline = now + connect_timeout
        self.reader = FrameReader(max_packet_size)
        self._out: list[bytes] = []
        self.receive_maximum = receive_maximum  # what we allow the client
        # made on first use: most connections never need them, and an idle connection's
        # memory is what a broker of many devices runs out of
        self._pending_in: set[int] | None = None
        self.topic_alias_maximum = topic_alias_maximum  # what we allow the client
        self._alias_in: dict[int, str] | None = None
        self.client_max_packet = MQTT_MAX_PACKET  # what the client allows us
        self.client_alias_max = 0
        self._alias_out: dict[str, int] | None = None
        self.problem_info = True
        self.client_id = ""
        # PUBACK/PUBREC cells in PUBLISH order, while some of them wait [MQTT-4.6.0-2]
        self._acks: deque[list[Any]] | None = None
        # Where a delivery of a topic goes when a transport has more than one output (MQTT
        # over QUIC's data streams): topic -> that output's chunk list. None: the one output.
        self.topic_out: Callable[[str], list[bytes]] | None = None
        self.auth_method: str | None = None  # the CONNECT's Authentication Method
        self.auth: Any = None  # the shard's enhanced-authentication state

    # -- input -------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        if self.state == CLOSED:
            return
        self.last_rx = now
        self.reader.feed(data)

    def next_packet(self, reader: FrameReader | None = None) -> Packet | None:
        """The next complete packet, or None. Raises ProtocolError.

        ``reader``: another input of the same connection (a QUIC data stream) instead of
        the main one; its packets share this connection's state."""
        state = self.state
        if state == CONNECTING or state == CLOSED:
            return None
        frame = (reader or self.reader).next_frame()
        if frame is None:
            return None
        first, body = frame
        if state == AWAIT_CONNECT:
            if first >> 4 == CONNECT:
                # kept so that a CONNECT which fails to decode is answered in its own version
                level = connect_protocol_level(body)
                self.version = level if level in _LEVELS else 0
            packet = decode(first, body, 0)
        else:
            packet = decode(first, body, self.version)
        ptype = packet.type
        if state == AWAIT_CONNECT:
            if ptype != CONNECT:
                raise ProtocolError(Reason.PROTOCOL_ERROR, "the first packet must be CONNECT")
            self._on_connect(packet)  # type: ignore[arg-type]
            return packet
        if state == AUTHENTICATING:
            if ptype == AUTH:
                if packet.reason_code != Reason.CONTINUE_AUTHENTICATION:  # type: ignore[attr-defined]
                    raise ProtocolError(Reason.PROTOCOL_ERROR,
                                        "AUTH during authentication must be 0x18")
                if packet.props.get(Prop.AUTHENTICATION_METHOD) != self.auth_method:  # type: ignore[attr-defined]
                    raise ProtocolError(Reason.PROTOCOL_ERROR,
                                        "AUTH with another authentication method")
                self.state = CONNECTING  # the shard answers: challenge again, accept or refuse
                return packet
            if ptype == DISCONNECT:
                self.state = CLOSED
                return packet
            raise ProtocolError(Reason.PROTOCOL_ERROR, "only AUTH may follow an AUTH challenge")
        if ptype == PUBLISH:
            self._on_publish(packet)  # type: ignore[arg-type]
        elif ptype == CONNECT:
            raise ProtocolError(Reason.PROTOCOL_ERROR, "second CONNECT")
        elif ptype in _SERVER_ONLY:
            raise ProtocolError(Reason.PROTOCOL_ERROR, "a client may not send this packet type")
        elif ptype == AUTH and self.version != MQTT_5:
            raise ProtocolError(Reason.MALFORMED_PACKET, "AUTH before MQTT 5")
        return packet

    def _on_connect(self, packet: Connect) -> None:
        self.version = packet.protocol_level
        self.state = CONNECTING
        self.client_id = packet.client_id
        props = packet.props
        if props:
            self.auth_method = props.get(Prop.AUTHENTICATION_METHOD)
            self.client_max_packet = props.get(Prop.MAXIMUM_PACKET_SIZE, MQTT_MAX_PACKET)
            self.client_alias_max = props.get(Prop.TOPIC_ALIAS_MAXIMUM, 0)
            self.problem_info = props.get(Prop.REQUEST_PROBLEM_INFORMATION, 1) == 1

    def _on_publish(self, packet: Publish) -> None:
        props = packet.props
        if props:
            if Prop.SUBSCRIPTION_IDENTIFIER in props:
                raise ProtocolError(Reason.PROTOCOL_ERROR,
                                    "a client PUBLISH may not carry a subscription identifier")
            alias = props.get(Prop.TOPIC_ALIAS)
            if alias is not None:
                if alias == 0 or alias > self.topic_alias_maximum:
                    raise ProtocolError(Reason.TOPIC_ALIAS_INVALID,
                                        f"topic alias {alias} outside 1..{self.topic_alias_maximum}")
                if packet.topic:
                    if self._alias_in is None:
                        self._alias_in = {}
                    self._alias_in[alias] = packet.topic
                else:
                    topic = self._alias_in.get(alias) if self._alias_in is not None else None
                    if topic is None:
                        raise ProtocolError(Reason.PROTOCOL_ERROR, f"unknown topic alias {alias}")
                    packet.topic = topic
        if packet.qos:
            pid = packet.packet_id
            pending = self._pending_in
            if pending is None:
                pending = self._pending_in = set()
            if pid not in pending:
                if len(pending) >= self.receive_maximum:
                    raise ProtocolError(Reason.RECEIVE_MAXIMUM_EXCEEDED,
                                        f"more than {self.receive_maximum} QoS>0 publishes unacknowledged")
                pending.add(pid)

    # -- session establishment -----------------------------------------------

    def accept(self, connack: Connack, keepalive: int) -> None:
        self.keepalive = keepalive
        self.state = CONNECTED
        self._write(encode(connack, self.version))

    def challenge(self, data: bytes) -> None:
        """Continue enhanced authentication: AUTH 0x18 with ``data``, then wait for the
        client's AUTH (the connection must be CONNECTING, after a CONNECT that named a
        method)."""
        assert self.state == CONNECTING and self.auth_method is not None
        self._write(encode(Auth(Reason.CONTINUE_AUTHENTICATION, {
            Prop.AUTHENTICATION_METHOD: self.auth_method, Prop.AUTHENTICATION_DATA: data}),
            MQTT_5))
        self.state = AUTHENTICATING

    def refuse(self, reason: int, message: str = "") -> None:
        """Answer the CONNECT with a failing CONNACK and close."""
        props: Properties = {}
        if message and self.version == MQTT_5:
            props[Prop.REASON_STRING] = message
        self._write(encode(Connack(False, reason, props), self.version))
        self.state = CLOSED

    # -- output ----------------------------------------------------------------

    def send(self, packet: Packet) -> None:
        if self.state == CLOSED:
            return
        ptype = packet.type
        if ptype == PUBACK or ptype == PUBCOMP or (ptype == PUBREC and packet.reason_code >= 0x80):  # type: ignore[attr-defined]
            if self._pending_in:
                self._pending_in.discard(packet.packet_id)  # type: ignore[attr-defined]
        props = getattr(packet, "props", None)
        if props and not self.problem_info and ptype not in _PROBLEM_INFO_EXEMPT:
            packet.props = {k: v for k, v in props.items()  # type: ignore[attr-defined]
                            if k != Prop.REASON_STRING and k != Prop.USER_PROPERTY}
        data = encode(packet, self.version)
        if len(data) > self.client_max_packet:
            # [MQTT-3.1.2-24]: never send more than the client accepts; an ack with
            # properties shrinks to its bare form rather than vanish
            if props:
                packet.props = {}  # type: ignore[attr-defined]
                data = encode(packet, self.version)
            if len(data) > self.client_max_packet:
                return
        self._write(data)

    def reserve_ack(self) -> list[Any]:
        """A place in the acknowledgement order for an ack decided later; it goes to the
        output that is current now (the stream the PUBLISH came on)."""
        cell: list[Any] = [None, self._out]
        if self._acks is None:
            self._acks = deque()
        self._acks.append(cell)
        return cell

    def release_ack(self, cell: list[Any], packet: Packet) -> None:
        """Fill a reserved place; every ack at the head of the order goes out."""
        cell[0] = packet
        acks = self._acks
        current = self._out
        while acks and acks[0][0] is not None:
            ready, out = acks.popleft()
            self._out = out
            self.send(ready)
        self._out = current

    def send_puback(self, packet_id: int) -> None:
        """A success PUBACK without properties: the QoS 1 hot path. Its bytes are fixed
        but for the id (v5 may omit reason 0 and empty properties [MQTT-3.4.2-1]), so no
        Puback object is built and encoded; anything unusual takes the general path."""
        if self._acks or self.state == CLOSED or self.client_max_packet < 4:
            self.send_ack(Puback(packet_id))
            return
        pending = self._pending_in
        if pending:
            pending.discard(packet_id)
        self._out.append(_PUBACK_HEADS[packet_id >> 8] + _ONE_BYTE[packet_id & 0xFF])

    def here(self) -> list[bytes]:
        """The output current now, for an answer decided later (see :meth:`send_on`): a
        QUIC data stream's while one of its packets is handled, else the one output."""
        return self._out

    def send_on(self, out: list[bytes], packet: Packet) -> None:
        """:meth:`send` into an output taken with :meth:`here` earlier."""
        current = self._out
        self._out = out
        try:
            self.send(packet)
        finally:
            self._out = current

    def send_ack(self, packet: Packet) -> None:
        """An ack decided now: behind any that wait, or straight out."""
        if self._acks:
            self.release_ack(self.reserve_ack(), packet)
        else:
            self.send(packet)

    def send_publish(self, topic: str, payload: bytes, qos: int, retain: bool, packet_id: int,
                     props: bytes | Properties | None, dup: bool = False,
                     shared: dict[tuple[int, int, bool, bool], tuple[bytes, bytes | None]] | None = None,
                     ) -> bool:
        """Encode one delivery. False if it exceeds the client's maximum packet size
        (then it is dropped as if sent [MQTT-3.1.2-25]).

        ``shared`` is a fan-out's encoding cache: every connection of the same version
        writes the same bytes but for the packet id, so the packet is encoded once and
        queued as (head, packet id, tail) chunks that the flush joins anyway. Not used
        with outbound topic aliases, which differ per connection.

        ``props`` is best an encoded property block (the broker's deliveries pass one);
        a dict is encoded here.
        """
        if self.state != CONNECTED:
            return False
        if self.topic_out is not None:
            return self._routed_publish(topic, payload, qos, retain, packet_id, props, dup, shared)
        version = self.version
        if shared is not None and not (version == MQTT_5 and self.client_alias_max):
            key = (version, qos, retain, dup)
            entry = shared.get(key)
            if entry is None:
                if props.__class__ is dict:
                    props = encode_properties(props)  # type: ignore[arg-type]
                data = encode_publish(topic, payload, qos, retain, dup, 1 if qos else 0,
                                      props if version == MQTT_5 else None, version)
                if qos:
                    # fixed header, topic, then the packet id to patch per connection
                    at = len(data) - len(payload) - (
                        (len(props) if props else 1) if version == MQTT_5 else 0) - 2  # type: ignore[arg-type]
                    entry = (data[:at], data[at + 2:])
                else:
                    entry = (data, None)
                shared[key] = entry
            head, tail = entry
            out = self._out
            if tail is None:
                if len(head) > self.client_max_packet:
                    return False
                out.append(head)
            else:
                if len(head) + 2 + len(tail) > self.client_max_packet:
                    return False
                out.append(head)
                out.append(_PIDS[packet_id] if packet_id < 256 else packet_id.to_bytes(2, "big"))
                out.append(tail)
            return True
        if props.__class__ is dict:  # not per delivery of a fan-out: checked after its path
            props = encode_properties(props)  # type: ignore[arg-type]
        if version != MQTT_5:
            data = encode_publish(topic, payload, qos, retain, dup, packet_id, None, version)
        elif not self.client_alias_max:
            data = encode_publish(topic, payload, qos, retain, dup, packet_id, props, version)
        else:
            aliases = self._alias_out
            if aliases is None:
                aliases = self._alias_out = {}
            alias = aliases.get(topic)
            if alias is not None:
                extra = splice_properties(props, topic_alias_entry(alias))  # type: ignore[arg-type]
                data = encode_publish("", payload, qos, retain, dup, packet_id, extra, version)
            elif len(aliases) < self.client_alias_max:
                # a new alias counts only once the packet that announces it is sent
                alias = len(aliases) + 1
                extra = splice_properties(props, topic_alias_entry(alias))  # type: ignore[arg-type]
                data = encode_publish(topic, payload, qos, retain, dup, packet_id, extra, version)
                if len(data) <= self.client_max_packet:
                    aliases[topic] = alias
            else:
                data = encode_publish(topic, payload, qos, retain, dup, packet_id, props, version)
        if len(data) > self.client_max_packet:
            return False
        self._write(data)
        return True

    def _routed_publish(self, topic: str, payload: bytes, qos: int, retain: bool, packet_id: int,
                        props: Properties | bytes | None, dup: bool,
                        shared: dict[tuple[int, int, bool, bool], tuple[bytes, bytes | None]] | None,
                        ) -> bool:
        """send_publish into the output ``topic_out`` picks for the topic."""
        route = self.topic_out
        assert route is not None
        current = self._out
        self._out = route(topic)
        self.topic_out = None
        try:
            return self.send_publish(topic, payload, qos, retain, packet_id, props, dup, shared)
        finally:
            self._out = current
            self.topic_out = route

    def fail(self, err: ProtocolError) -> None:
        """The one mapping of a protocol error to what the peer is told, then close."""
        state = self.state
        if state == CLOSED:
            return
        if state == AWAIT_CONNECT:
            if err.reason == Reason.UNSUPPORTED_PROTOCOL_VERSION:
                # [MQTT-3.1.2-2]: answer an unknown level with the 3.1.1 CONNACK code 1
                self._write(b"\x20\x02\x00\x01")
            elif self.version == MQTT_5:
                # a CONNECT that failed to decode may be answered with its reason [MQTT-4.13.1]
                self._write(encode(Connack(False, err.reason), MQTT_5))
        elif state == CONNECTING or state == AUTHENTICATING:
            self.refuse(err.reason, err.message)
        elif self.version == MQTT_5:
            props = {Prop.REASON_STRING: err.message} if self.problem_info and err.message else {}
            self._write(encode(Disconnect(err.reason, props), MQTT_5))
        self.state = CLOSED

    def disconnect(self, reason: int, props: Properties | None = None) -> None:
        """A server-initiated close: MQTT 5 clients are told why; v3 has no DISCONNECT from the server."""
        if self.state == CLOSED:
            return
        if self.version == MQTT_5 and self.state == CONNECTED:
            self._write(encode(Disconnect(reason, props or {}), MQTT_5))
        self.state = CLOSED

    def _write(self, data: bytes) -> None:
        self._out.append(data)

    def has_output(self) -> bool:
        return bool(self._out)

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    # -- time ------------------------------------------------------------------

    def handle_timer(self, now: float) -> int | None:
        """The reason to close this connection now, if its time is up."""
        state = self.state
        if state == AWAIT_CONNECT or state == CONNECTING or state == AUTHENTICATING:
            if now >= self.connect_deadline:
                return Reason.MAXIMUM_CONNECT_TIME
            return None
        if state == CONNECTED and self.keepalive and now - self.last_rx > 1.5 * self.keepalive:
            return Reason.KEEP_ALIVE_TIMEOUT
        return None

    @property
    def closed(self) -> bool:
        return self.state == CLOSED
