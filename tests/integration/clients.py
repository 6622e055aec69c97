"""Small synchronous wrappers for black-box broker tests.

``Client`` wraps paho-mqtt 2.x (``CallbackAPIVersion.VERSION2``) so a test reads
top to bottom: every operation waits for its acknowledgement on an event with a
timeout, never on a fixed sleep. Received messages land in a thread-safe queue
(``get(timeout)`` / ``expect_none(timeout)``).

The network thread never reconnects on its own (paho's ``loop_start`` would):
a test that is disconnected by the broker must see that, not a silent retry.

``RawClient`` speaks just enough MQTT over a plain socket for the cases paho
hides (a client that sends CONNECT and then nothing, PINGREQ/PINGRESP).
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

TIMEOUT = 5.0
V311 = 4
V5 = 5


@dataclass
class ConnAck:
    reason_code: int
    session_present: bool
    properties: dict[str, Any]


@dataclass
class Msg:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    mid: int
    properties: dict[str, Any]


@dataclass
class Disconnected:
    reason_code: int
    from_server: bool  # a DISCONNECT packet came from the server (v5), not a bare socket close
    properties: dict[str, Any] = field(default_factory=dict)


def make_props(packet_type: int, values: dict[str, Any] | None) -> Properties | None:
    """``{"MessageExpiryInterval": 1, "UserProperty": [("k", "v")]}`` -> paho Properties."""
    if not values:
        return None
    props = Properties(packet_type)
    for name, value in values.items():
        if name == "UserProperty" and isinstance(value, list):
            for pair in value:
                props.UserProperty = pair
        else:
            setattr(props, name, value)
    return props


def props_dict(props: Properties | None) -> dict[str, Any]:
    """paho Properties -> ``{"MessageExpiryInterval": 5, "CorrelationData": b"..", ...}`` (present only)."""
    if props is None:
        return {}
    out = {}
    for name in props.names:
        attr = name.replace(" ", "")
        if hasattr(props, attr):
            out[attr] = getattr(props, attr)
    return out


def _code(rc: Any) -> int:
    return int(rc.value) if hasattr(rc, "value") else int(rc)


class _Paho(paho.Client):
    """paho client whose network thread stops instead of reconnecting."""

    def _thread_main(self) -> None:
        while not self._thread_terminate:
            rc = self.loop(0.02)
            if rc != paho.MQTT_ERR_SUCCESS and self._sock is None:
                break


class Client:
    def __init__(self, host: Any, port: int | None = None, client_id: str = "", *,
                 version: int = V5, manual_ack: bool = False, max_inflight: int = 20) -> None:
        if port is None:  # a Broker
            host, port = host.host, host.port
        self.host, self.port, self.client_id, self.version = host, port, client_id, version
        proto = paho.MQTTv5 if version == V5 else paho.MQTTv311
        kwargs: dict[str, Any] = {"client_id": client_id, "protocol": proto}
        if version != V5:
            kwargs["clean_session"] = True  # set per connection in connect()
        self.c = _Paho(paho.CallbackAPIVersion.VERSION2, **kwargs)
        self.c.manual_ack_set(manual_ack)
        self.c.max_inflight_messages_set(max_inflight)  # client-side window for our own publishes
        self.messages: queue.Queue[Msg] = queue.Queue()
        self._connack: queue.Queue[ConnAck] = queue.Queue()
        self._disconnects: queue.Queue[Disconnected] = queue.Queue()
        self._cond = threading.Condition()
        self._subacks: dict[int, tuple[list[int], dict[str, Any]]] = {}
        self._unsubacks: dict[int, list[int]] = {}
        self._pubacks: dict[int, int] = {}
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_unsubscribe = self._on_unsubscribe
        self.c.on_publish = self._on_publish
        self.c.on_disconnect = self._on_disconnect
        self.log: list[str] = []  # paho's debug log: which packets came and went
        self.c.on_log = lambda c, u, level, text: self.log.append(text)
        self.connected = False
        self.closed = False
        self.connack = ConnAck(-1, False, {})  # the last CONNACK

    # ---- callbacks (network thread) -------------------------------------------------
    def _on_connect(self, c: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connected = _code(rc) == 0
        self._connack.put(ConnAck(_code(rc), bool(flags.session_present), props_dict(props)))

    def _on_message(self, c: Any, userdata: Any, m: paho.MQTTMessage) -> None:
        self.messages.put(Msg(m.topic, bytes(m.payload), m.qos, bool(m.retain), bool(m.dup), m.mid,
                              props_dict(getattr(m, "properties", None))))

    def _on_subscribe(self, c: Any, userdata: Any, mid: int, codes: list[Any], props: Any) -> None:
        with self._cond:
            self._subacks[mid] = ([_code(x) for x in codes], props_dict(props))
            self._cond.notify_all()

    def _on_unsubscribe(self, c: Any, userdata: Any, mid: int, codes: list[Any], props: Any) -> None:
        with self._cond:
            self._unsubacks[mid] = [_code(x) for x in codes]
            self._cond.notify_all()

    def _on_publish(self, c: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        with self._cond:
            self._pubacks[mid] = _code(rc)
            self._cond.notify_all()

    def _on_disconnect(self, c: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connected = False
        self._disconnects.put(Disconnected(_code(rc), bool(flags.is_disconnect_packet_from_server),
                                           props_dict(props)))

    def _wait_for(self, table: dict[int, Any], mid: int, what: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in table:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.client_id}: no {what} for mid {mid} within {timeout}s")
                self._cond.wait(left)
            return table.pop(mid)

    # ---- operations (test thread) -----------------------------------------------------
    def will_set(self, topic: str, payload: bytes | str = b"", qos: int = 0, retain: bool = False,
                 properties: dict[str, Any] | None = None) -> None:
        self.c.will_set(topic, payload, qos, retain, make_props(PacketTypes.WILLMESSAGE, properties))

    def connect(self, *, clean: bool = True, keepalive: int = 60, session_expiry: int | None = None,
                properties: dict[str, Any] | None = None, timeout: float = TIMEOUT) -> ConnAck:
        """Connect and wait for CONNACK. ``clean`` is clean_session (v3.1.1) or clean_start (v5)."""
        props = dict(properties or {})
        if session_expiry is not None:
            props["SessionExpiryInterval"] = session_expiry
        if self.version == V5:
            self.c.connect(self.host, self.port, keepalive, clean_start=clean,
                           properties=make_props(PacketTypes.CONNECT, props))
        else:
            self.c._clean_session = clean
            self.c.connect(self.host, self.port, keepalive)
        self.c.loop_start()
        try:
            self.connack = self._connack.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.client_id}: no CONNACK within {timeout}s") from None
        return self.connack

    def subscribe(self, topic: str | list[tuple[str, int]], qos: int = 0, *, no_local: bool = False,
                  retain_as_published: bool = False, retain_handling: int = 0,
                  properties: dict[str, Any] | None = None, timeout: float = TIMEOUT) -> list[int]:
        """Subscribe and wait for SUBACK; returns the granted QoS / reason codes."""
        return self.subscribe_full(topic, qos, no_local=no_local, retain_as_published=retain_as_published,
                                   retain_handling=retain_handling, properties=properties,
                                   timeout=timeout)[0]

    def subscribe_full(self, topic: str | list[tuple[str, int]], qos: int = 0, *, no_local: bool = False,
                       retain_as_published: bool = False, retain_handling: int = 0,
                       properties: dict[str, Any] | None = None,
                       timeout: float = TIMEOUT) -> tuple[list[int], dict[str, Any]]:
        props = make_props(PacketTypes.SUBSCRIBE, properties)
        if self.version == V5:
            def mk(q: int) -> SubscribeOptions:
                return SubscribeOptions(qos=q, noLocal=no_local, retainAsPublished=retain_as_published,
                                        retainHandling=retain_handling)
            if isinstance(topic, list):
                rc, mid = self.c.subscribe([(t, mk(q)) for t, q in topic], properties=props)
            else:
                rc, mid = self.c.subscribe(topic, options=mk(qos), properties=props)
        elif isinstance(topic, list):
            rc, mid = self.c.subscribe(topic)
        else:
            rc, mid = self.c.subscribe(topic, qos=qos)
        assert rc == paho.MQTT_ERR_SUCCESS, f"subscribe not sent: {rc}"
        assert mid is not None
        return self._wait_for(self._subacks, mid, "SUBACK", timeout)  # type: ignore[no-any-return]

    def unsubscribe(self, topic: str, timeout: float = TIMEOUT) -> list[int]:
        rc, mid = self.c.unsubscribe(topic)
        assert rc == paho.MQTT_ERR_SUCCESS and mid is not None, f"unsubscribe not sent: {rc}"
        return self._wait_for(self._unsubacks, mid, "UNSUBACK", timeout)  # type: ignore[no-any-return]

    def publish_nowait(self, topic: str, payload: bytes | str = b"", qos: int = 0, retain: bool = False,
                       properties: dict[str, Any] | None = None) -> paho.MQTTMessageInfo:
        info = self.c.publish(topic, payload, qos, retain, make_props(PacketTypes.PUBLISH, properties))
        assert info.rc == paho.MQTT_ERR_SUCCESS, f"publish not queued: {info.rc}"
        return info

    def wait_published(self, info: paho.MQTTMessageInfo, timeout: float = TIMEOUT) -> int:
        """Wait until a publish completes (written for QoS 0, PUBACK / PUBCOMP for 1 / 2).

        Returns the v5 reason code of the acknowledgement (0 for QoS 0 and v3.1.1)."""
        code = self._wait_for(self._pubacks, info.mid, "publish completion", timeout)
        return int(code)

    def publish(self, topic: str, payload: bytes | str = b"", qos: int = 0, retain: bool = False,
                properties: dict[str, Any] | None = None, timeout: float = TIMEOUT) -> int:
        """Publish and wait for completion; returns the acknowledgement's reason code."""
        return self.wait_published(self.publish_nowait(topic, payload, qos, retain, properties), timeout)

    def ack(self, msg: Msg) -> None:
        """Acknowledge a message received with ``manual_ack=True``."""
        self.c.ack(msg.mid, msg.qos)

    def get(self, timeout: float = TIMEOUT) -> Msg:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.client_id}: no message within {timeout}s") from None

    def get_n(self, n: int, timeout: float = TIMEOUT) -> list[Msg]:
        deadline = time.monotonic() + timeout
        out = []
        for i in range(n):
            try:
                out.append(self.messages.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise TimeoutError(f"{self.client_id}: got {i} of {n} messages within {timeout}s") from None
        return out

    def expect_none(self, timeout: float = 0.5) -> None:
        try:
            m = self.messages.get(timeout=timeout)
        except queue.Empty:
            return
        raise AssertionError(f"{self.client_id}: unexpected message {m}")

    def wait_disconnect(self, timeout: float = TIMEOUT) -> Disconnected:
        try:
            return self._disconnects.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.client_id}: still connected after {timeout}s") from None

    def disconnect(self, reason_code: int = 0, properties: dict[str, Any] | None = None,
                   timeout: float = TIMEOUT) -> None:
        """Send DISCONNECT (v5: with ``reason_code``) and wait until the socket is closed."""
        if self.version == V5:
            rc = paho.ReasonCode(PacketTypes.DISCONNECT, identifier=reason_code)
            self.c.disconnect(rc, make_props(PacketTypes.DISCONNECT, properties))
        else:
            self.c.disconnect()
        self.wait_disconnect(timeout)
        self.close()

    def abort(self) -> None:
        """Drop the connection without DISCONNECT, like a crashed client (the broker sees EOF)."""
        self.c.loop_stop()
        sock = self.c.socket()
        if isinstance(sock, socket.socket):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.c.loop_stop()
        self.c._reset_sockets()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


class Clients:
    """Creates connected clients for a test and drops them all at the end.

    Use as a context manager or through a per-module fixture::

        @pytest.fixture
        def clients(broker):
            with Clients(broker) as c:
                yield c
    """

    def __init__(self, broker: Any) -> None:
        self.broker = broker
        self._all: list[Client] = []

    def new(self, client_id: str, *, version: int = V5, manual_ack: bool = False,
            broker: Any = None, max_inflight: int = 20) -> Client:
        """A client that is not connected yet (set a will, then ``connect()``)."""
        c = Client(broker or self.broker, None, client_id, version=version, manual_ack=manual_ack,
                   max_inflight=max_inflight)
        self._all.append(c)
        return c

    def connect(self, client_id: str, *, version: int = V5, manual_ack: bool = False, broker: Any = None,
                max_inflight: int = 20, expect_rc: int = 0, **kwargs: Any) -> Client:
        c = self.new(client_id, version=version, manual_ack=manual_ack, broker=broker,
                     max_inflight=max_inflight)
        ack = c.connect(**kwargs)
        assert ack.reason_code == expect_rc, f"CONNACK {ack}"
        return c

    def close_all(self) -> None:
        for c in self._all:
            c.abort()

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close_all()


# ---- raw MQTT over a socket --------------------------------------------------------------

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def packet(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([ptype << 4 | flags]) + _varint(len(body)) + body


def connect_packet(client_id: str, *, version: int = V311, keepalive: int = 60, clean: bool = True,
                   props: bytes = b"") -> bytes:
    body = _str("MQTT") + bytes([version, 0x02 if clean else 0]) + struct.pack("!H", keepalive)
    if version == V5:
        body += _varint(len(props)) + props
    return packet(CONNECT, 0, body + _str(client_id))


def publish_packet(topic: str, payload: bytes, *, qos: int = 0, mid: int = 0, dup: bool = False,
                   retain: bool = False, version: int = V311) -> bytes:
    body = _str(topic) + (struct.pack("!H", mid) if qos else b"")
    if version == V5:
        body += b"\x00"  # no properties
    return packet(PUBLISH, (0x08 if dup else 0) | qos << 1 | (1 if retain else 0), body + payload)


def ack_packet(ptype: int, mid: int) -> bytes:
    """PUBACK / PUBREC / PUBREL / PUBCOMP with only a packet id (valid for 3.1.1 and 5.0)."""
    return packet(ptype, 0x02 if ptype == PUBREL else 0, struct.pack("!H", mid))


def session_expiry_prop(seconds: int) -> bytes:
    return b"\x11" + struct.pack("!I", seconds)


def connack_props(body: bytes) -> dict[str, Any]:
    """Properties of a v5 CONNACK body (after the flags and reason code bytes)."""
    props = Properties(PacketTypes.CONNACK)
    props.unpack(body[2:])
    return props_dict(props)


class RawClient:
    def __init__(self, broker: Any, timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection((broker.host, broker.port), timeout=timeout)
        self._buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self, n: int, deadline: float) -> bytes | None:
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no packet from the broker in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError("no packet from the broker in time") from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def recv_packet(self, timeout: float = TIMEOUT) -> tuple[int, int, bytes] | None:
        """(type, flags, body) of the next packet, or None when the broker closed the connection."""
        deadline = time.monotonic() + timeout
        head = self._read(1, deadline)
        if head is None:
            return None
        length, shift = 0, 0
        while True:
            b = self._read(1, deadline)
            if b is None:
                return None
            length |= (b[0] & 0x7F) << shift
            shift += 7
            if not b[0] & 0x80:
                break
        body = self._read(length, deadline) if length else b""
        if body is None:
            return None
        return head[0] >> 4, head[0] & 0x0F, body

    def expect(self, ptype: int, timeout: float = TIMEOUT) -> tuple[int, bytes]:
        """The next packet, which must be of ``ptype``; returns (flags, body)."""
        p = self.recv_packet(timeout)
        assert p is not None, f"connection closed while waiting for packet type {ptype}"
        assert p[0] == ptype, f"expected packet type {ptype}, got {p}"
        return p[1], p[2]

    def wait_eof(self, timeout: float = TIMEOUT) -> list[tuple[int, int, bytes]]:
        """Read until the broker closes the connection; returns the packets read on the way."""
        deadline = time.monotonic() + timeout
        seen: list[tuple[int, int, bytes]] = []
        while True:
            p = self.recv_packet(max(0.0, deadline - time.monotonic()))
            if p is None:
                return seen
            seen.append(p)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
