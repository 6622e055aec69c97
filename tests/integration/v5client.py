"""Small MQTT 5 clients for the black-box integration tests in ``test_v5_*.py``.

Two flavours:

* :class:`V5Client` wraps the real paho-mqtt 2.x client (``CallbackAPIVersion.VERSION2``)
  and makes it synchronous: every callback feeds a queue or a result table that the
  test waits on with a timeout. paho's own network thread (``loop_start``) runs it,
  with ``reconnect_on_failure=False`` so paho never reconnects behind the test's back,
  which matters for tests that expect the broker to disconnect them. (A private thread
  calling ``loop()`` is not an option: paho then believes it is single-threaded and
  writes to the socket from whichever thread publishes, racing the loop.)
* :class:`RawClient` speaks MQTT over a plain socket, for what paho cannot express or
  would hide: pipelining several PUBLISH packets, empty client ids with
  clean_session=0, reading the exact bytes and properties the broker sends.

Properties are compared as plain dicts (``{"MessageExpiryInterval": 9, ...}``) built
by :func:`pdict` from what the client actually received.
"""

from __future__ import annotations

import collections
import queue
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

TIMEOUT = 5.0      # how long a test waits for something that must happen
QUIET = 0.5        # how long a test watches for something that must not happen

__all__ = ["TIMEOUT", "QUIET", "PacketTypes", "Properties", "SubscribeOptions", "props", "pdict",
           "Msg", "V5Client", "RawClient", "Packet", "Pool", "clients"]


# --------------------------------------------------------------------------- properties

def props(packet_type: int, **values: Any) -> Properties:
    """``props(PacketTypes.PUBLISH, MessageExpiryInterval=10, UserProperty=[("a", "1")])``."""
    p = Properties(packet_type)
    for name, value in values.items():
        setattr(p, name, value)
    return p


def pdict(p: Properties | None) -> dict[str, Any]:
    """The properties that are present, by compressed name (``"TopicAlias"``)."""
    if p is None:
        return {}
    out: dict[str, Any] = {}
    for name in p.names:
        key = name.replace(" ", "")
        if hasattr(p, key):
            out[key] = getattr(p, key)
    return out


def _code(rc: Any) -> int:
    """A paho ReasonCode / int / MQTTErrorCode as a plain int."""
    return int(getattr(rc, "value", rc))


# --------------------------------------------------------------------------- paho wrapper

@dataclass
class Msg:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    props: dict[str, Any]


@dataclass
class Disconnect:
    from_server: bool
    reason: int
    props: dict[str, Any]


class V5Client:
    """A paho client that connects in the constructor and is driven synchronously.

    ``connect_props`` are CONNECT properties by compressed name. After construction,
    ``connack_code``, ``connack_props`` and ``session_present`` describe the CONNACK.
    """

    def __init__(self, broker: Any, client_id: str = "", *, protocol: int = mqtt.MQTTv5,
                 clean_start: bool = True, connect_props: dict[str, Any] | None = None,
                 manual_ack: bool = False, keepalive: int = 60, timeout: float = TIMEOUT,
                 require_success: bool = True) -> None:
        self.protocol = protocol
        kwargs: dict[str, Any] = {}
        if protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = clean_start
        self._c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                              reconnect_on_failure=False, **kwargs)
        self._c.max_inflight_messages_set(0)     # never hold our own publishes back
        self._c.max_queued_messages_set(0)
        if manual_ack:
            self._c.manual_ack_set(True)
        self.messages: queue.Queue[Msg] = queue.Queue()
        self.disconnects: queue.Queue[Disconnect] = queue.Queue()
        self._results: dict[tuple[str, int], Any] = {}
        self._cond = threading.Condition()
        self._connack = threading.Event()
        self._closed = False
        self._gone = threading.Event()      # the connection ended (on_disconnect ran)
        self.connack_code: int | None = None
        self.connack_props: dict[str, Any] = {}
        self.session_present: bool | None = None

        self._c.on_connect = self._on_connect
        self._c.on_message = self._on_message
        self._c.on_subscribe = self._on_subscribe
        self._c.on_unsubscribe = self._on_unsubscribe
        self._c.on_publish = self._on_publish
        self._c.on_disconnect = self._on_disconnect
        self.log: collections.deque[str] = collections.deque(maxlen=40)   # paho's own log, for failures
        self._c.on_log = lambda client, userdata, level, buf: self.log.append(buf)

        cprops = None
        if connect_props:
            cprops = props(PacketTypes.CONNECT, **connect_props)
        if protocol == mqtt.MQTTv5:
            self._c.connect(broker.host, broker.port, keepalive, clean_start=clean_start,
                            properties=cprops)
        else:
            self._c.connect(broker.host, broker.port, keepalive)
        self._c.loop_start()
        assert self._connack.wait(timeout), "no CONNACK"
        if require_success:
            assert self.connack_code == 0, f"CONNACK reason {self.connack_code:#x}"

    # ---- callbacks (network thread)
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connack_code = _code(reason_code)
        self.connack_props = pdict(properties)
        self.session_present = bool(flags.session_present)
        self._connack.set()

    def _on_message(self, client, userdata, message) -> None:
        self.messages.put(Msg(message.topic, message.payload, message.qos, bool(message.retain),
                              message.mid, pdict(getattr(message, "properties", None))))

    def _store(self, kind: str, mid: int, value: Any) -> None:
        with self._cond:
            self._results[(kind, mid)] = value
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self._store("sub", mid, ([_code(rc) for rc in reason_codes], pdict(properties)))

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self._store("unsub", mid, ([_code(rc) for rc in reason_codes], pdict(properties)))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._store("pub", mid, (_code(reason_code), pdict(properties)))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.disconnects.put(Disconnect(bool(flags.is_disconnect_packet_from_server),
                                        _code(reason_code), pdict(properties)))
        self._gone.set()

    def _wait(self, kind: str, mid: int, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while (kind, mid) not in self._results:
                left = deadline - time.monotonic()
                assert left > 0, f"no {kind} ack for mid {mid}"
                self._cond.wait(left)
            return self._results.pop((kind, mid))

    # ---- operations (test thread)
    def subscribe(self, *subs: tuple[str, int | SubscribeOptions], sub_id: int | None = None,
                  user_props: list[tuple[str, str]] | None = None,
                  timeout: float = TIMEOUT) -> list[int]:
        """Subscribe to ``(filter, qos-or-SubscribeOptions)`` pairs in one SUBSCRIBE and
        return the SUBACK reason codes."""
        return self.subscribe_full(*subs, sub_id=sub_id, user_props=user_props, timeout=timeout)[0]

    def subscribe_full(self, *subs: tuple[str, int | SubscribeOptions], sub_id: int | None = None,
                       user_props: list[tuple[str, str]] | None = None,
                       timeout: float = TIMEOUT) -> tuple[list[int], dict[str, Any]]:
        sprops = None
        if self.protocol == mqtt.MQTTv5 and (sub_id is not None or user_props):
            sprops = Properties(PacketTypes.SUBSCRIBE)
            if sub_id is not None:
                sprops.SubscriptionIdentifier = sub_id
            if user_props:
                sprops.UserProperty = list(user_props)
        topics = [(t, o if isinstance(o, SubscribeOptions) or self.protocol != mqtt.MQTTv5
                   else SubscribeOptions(qos=o)) for t, o in subs]
        rc, mid = self._c.subscribe(topics, properties=sprops)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"subscribe failed locally: {rc}"
        return self._wait("sub", mid, timeout)

    def unsubscribe(self, *filters: str, timeout: float = TIMEOUT) -> list[int]:
        rc, mid = self._c.unsubscribe(list(filters))
        assert rc == mqtt.MQTT_ERR_SUCCESS
        return self._wait("unsub", mid, timeout)[0]

    def publish(self, topic: str, payload: bytes | str = b"", qos: int = 0, retain: bool = False,
                wait: bool = True, timeout: float = TIMEOUT, **publish_props: Any) -> int | None:
        """Publish; for QoS 1/2 with ``wait`` return the PUBACK/PUBREC reason code."""
        return self.publish_full(topic, payload, qos, retain, wait, timeout, **publish_props)[0]

    def publish_full(self, topic: str, payload: bytes | str = b"", qos: int = 0,
                     retain: bool = False, wait: bool = True, timeout: float = TIMEOUT,
                     **publish_props: Any) -> tuple[int | None, dict[str, Any]]:
        pprops = props(PacketTypes.PUBLISH, **publish_props) if publish_props else None
        info = self._c.publish(topic, payload, qos=qos, retain=retain, properties=pprops)
        if info.rc == mqtt.MQTT_ERR_NO_CONN and self._gone.wait(timeout):
            # a PUBLISH the broker refuses at once (answered with DISCONNECT) can close the
            # connection before paho's publish() returns: the test reads the DISCONNECT
            return None, {}
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, \
            f"publish failed locally: {info.rc}; paho log: {list(self.log)}"
        if qos == 0 or not wait:
            return None, {}
        return self._wait("pub", info.mid, timeout)

    def ack(self, msg: Msg) -> None:
        """Acknowledge a QoS 1 message (``manual_ack=True`` clients)."""
        assert msg.qos == 1
        self._c.ack(msg.mid, 1)

    def get(self, timeout: float = TIMEOUT) -> Msg:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout}s") from None

    def collect(self, n: int, timeout: float = TIMEOUT) -> list[Msg]:
        """The next ``n`` messages, waiting up to ``timeout`` overall."""
        deadline = time.monotonic() + timeout
        out = []
        while len(out) < n:
            left = deadline - time.monotonic()
            try:
                out.append(self.messages.get(timeout=max(left, 0.001)))
            except queue.Empty:
                raise AssertionError(f"got {len(out)} of {n} messages: "
                                     f"{[(m.topic, m.payload) for m in out]}") from None
        return out

    def drain(self, quiet: float = QUIET) -> list[Msg]:
        """Everything that arrives until nothing has arrived for ``quiet`` seconds."""
        out = []
        while True:
            try:
                out.append(self.messages.get(timeout=quiet))
            except queue.Empty:
                return out

    def expect_no_message(self, quiet: float = QUIET) -> None:
        extra = self.drain(quiet)
        assert not extra, f"unexpected messages: {[(m.topic, m.payload, m.props) for m in extra]}"

    def wait_disconnect(self, timeout: float = TIMEOUT) -> Disconnect:
        try:
            return self.disconnects.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"not disconnected within {timeout}s") from None

    def close(self) -> None:
        """Send DISCONNECT (normal disconnection) and stop the network thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._c.disconnect()
        except Exception:
            pass
        thread = self._c._thread            # paho closes the socket once DISCONNECT is out,
        if thread is not None:              # and with reconnect_on_failure=False its thread ends
            thread.join(5)
            assert not thread.is_alive(), "paho network thread did not stop"
        self._c.loop_stop()

    def __enter__(self) -> V5Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- raw socket client

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def packet(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([(ptype << 4) | flags]) + varint(len(body)) + body


def encode_props(packet_type: int, values: dict[str, Any] | bytes | None) -> bytes:
    """Properties with their length prefix; ``bytes`` are taken as already encoded."""
    if values is None:
        return b"\x00"
    if isinstance(values, bytes):
        return varint(len(values)) + values
    return props(packet_type, **values).pack()


def decode_props(packet_type: int, data: bytes) -> tuple[dict[str, Any], int]:
    p, used = Properties(packet_type).unpack(data)
    return pdict(p), used


@dataclass
class Packet:
    type: int
    flags: int
    body: bytes
    # parsed fields, filled for the packet types tests look at
    pid: int | None = None
    reason: int | None = None
    reasons: list[int] = field(default_factory=list)
    props: dict[str, Any] = field(default_factory=dict)
    topic: str | None = None
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    session_present: bool = False

    def __repr__(self) -> str:
        return (f"Packet(type={self.type}, pid={self.pid}, reason={self.reason}, "
                f"reasons={self.reasons}, topic={self.topic!r}, props={self.props})")


class RawClient:
    """Bytes on a socket. ``version`` is 5 or 4 (3.1.1) and decides how packets parse."""

    def __init__(self, broker: Any, version: int = 5, timeout: float = TIMEOUT) -> None:
        self.version = version
        self.sock = socket.create_connection((broker.host, broker.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""
        self.closed = False

    # ---- sending
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def connect_packet(self, client_id: str = "", *, clean: bool = True, keepalive: int = 60,
                       props_: dict[str, Any] | bytes | None = None) -> bytes:
        flags = 0x02 if clean else 0
        body = mqtt_str("MQTT") + bytes([self.version, flags]) + struct.pack("!H", keepalive)
        if self.version == 5:
            body += encode_props(PacketTypes.CONNECT, props_)
        body += mqtt_str(client_id)
        return packet(CONNECT, 0, body)

    def connect(self, client_id: str = "", *, clean: bool = True, keepalive: int = 60,
                props_: dict[str, Any] | bytes | None = None, timeout: float = TIMEOUT) -> Packet:
        self.send(self.connect_packet(client_id, clean=clean, keepalive=keepalive, props_=props_))
        p = self.recv(timeout)
        assert p is not None and p.type == CONNACK, f"expected CONNACK, got {p}"
        return p

    def publish_packet(self, topic: str | bytes, payload: bytes = b"", qos: int = 0,
                       pid: int | None = None, retain: bool = False, dup: bool = False,
                       props_: dict[str, Any] | bytes | None = None) -> bytes:
        flags = (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
        body = mqtt_str(topic)
        if qos:
            assert pid is not None
            body += struct.pack("!H", pid)
        if self.version == 5:
            body += encode_props(PacketTypes.PUBLISH, props_)
        return packet(PUBLISH, flags, body + payload)

    def publish(self, *args: Any, **kwargs: Any) -> None:
        self.send(self.publish_packet(*args, **kwargs))

    def subscribe(self, pid: int, subs: list[tuple[str, int]],
                  props_: dict[str, Any] | bytes | None = None, timeout: float = TIMEOUT) -> Packet:
        """``subs`` are (filter, options byte). Returns the SUBACK."""
        self.send_subscribe(pid, subs, props_)
        return self.expect(SUBACK, timeout)

    def send_subscribe(self, pid: int, subs: list[tuple[str, int]],
                       props_: dict[str, Any] | bytes | None = None) -> None:
        body = struct.pack("!H", pid)
        if self.version == 5:
            body += encode_props(PacketTypes.SUBSCRIBE, props_)
        for f, opts in subs:
            body += mqtt_str(f) + bytes([opts])
        self.send(packet(SUBSCRIBE, 2, body))

    def suback_or_disconnect(self, pid: int, subs: list[tuple[str, int]],
                             props_: dict[str, Any] | bytes | None = None,
                             timeout: float = TIMEOUT) -> tuple[str, list[int]]:
        """For refusals the spec lets the server express either way: send SUBSCRIBE and
        return ``("suback", reason codes)`` or ``("disconnect", [reason])``."""
        self.send_subscribe(pid, subs, props_)
        p = self.recv(timeout)
        assert p is not None, "connection closed without SUBACK or DISCONNECT"
        if p.type == SUBACK:
            return "suback", p.reasons
        assert p.type == DISCONNECT, f"expected SUBACK or DISCONNECT, got {p}"
        return "disconnect", [p.reason if p.reason is not None else 0]

    def ack(self, ptype: int, pid: int, reason: int = 0) -> None:
        body = struct.pack("!H", pid)
        if self.version == 5 and reason:
            body += bytes([reason])
        self.send(packet(ptype, 2 if ptype == PUBREL else 0, body))

    def disconnect(self, reason: int = 0) -> None:
        body = bytes([reason]) if self.version == 5 and reason else b""
        try:
            self.send(packet(DISCONNECT, 0, body))
        except OSError:
            pass

    # ---- receiving
    def _read(self, n: int, deadline: float) -> bytes | None:
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed = True
                return None
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def recv(self, timeout: float = TIMEOUT) -> Packet | None:
        """The next packet, ``None`` when the broker closed the connection; raises
        ``TimeoutError`` if nothing complete arrives in time."""
        deadline = time.monotonic() + timeout
        head = self._read(1, deadline)
        if head is None:
            return None
        length, mult = 0, 1
        while True:
            b = self._read(1, deadline)
            if b is None:
                return None
            length += (b[0] & 0x7F) * mult
            mult *= 128
            if not b[0] & 0x80:
                break
        body = self._read(length, deadline) if length else b""
        if body is None:
            return None
        return self._parse(head[0] >> 4, head[0] & 0x0F, body)

    def _parse(self, ptype: int, flags: int, body: bytes) -> Packet:
        p = Packet(ptype, flags, body)
        v5 = self.version == 5
        if ptype == CONNACK:
            p.session_present = bool(body[0] & 1)
            p.reason = body[1]
            if v5 and len(body) > 2:
                p.props, _ = decode_props(PacketTypes.CONNACK, body[2:])
        elif ptype == PUBLISH:
            p.qos, p.retain = (flags >> 1) & 3, bool(flags & 1)
            tlen = struct.unpack("!H", body[:2])[0]
            p.topic = body[2:2 + tlen].decode("utf-8")
            i = 2 + tlen
            if p.qos:
                p.pid = struct.unpack("!H", body[i:i + 2])[0]
                i += 2
            if v5:
                p.props, used = decode_props(PacketTypes.PUBLISH, body[i:])
                i += used
            p.payload = body[i:]
        elif ptype in (PUBACK, PUBREC, PUBREL, PUBCOMP):
            p.pid = struct.unpack("!H", body[:2])[0]
            p.reason = body[2] if len(body) > 2 else 0
            if v5 and len(body) > 3:
                p.props, _ = decode_props(ptype, body[3:])
        elif ptype in (SUBACK, UNSUBACK):
            p.pid = struct.unpack("!H", body[:2])[0]
            i = 2
            if v5:
                p.props, used = decode_props(ptype, body[2:])
                i += used
            p.reasons = list(body[i:])
        elif ptype == DISCONNECT:
            p.reason = body[0] if body else 0
            if len(body) > 1:
                p.props, _ = decode_props(PacketTypes.DISCONNECT, body[1:])
        return p

    def expect(self, ptype: int, timeout: float = TIMEOUT) -> Packet:
        p = self.recv(timeout)
        assert p is not None, f"connection closed while waiting for packet type {ptype}"
        assert p.type == ptype, f"expected packet type {ptype}, got {p}"
        return p

    def wait_disconnect(self, timeout: float = TIMEOUT) -> Packet | None:
        """Read until the broker sends DISCONNECT (returned) or closes the socket
        (``None``). Other packets on the way are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "broker neither sent DISCONNECT nor closed the connection"
            try:
                p = self.recv(left)
            except TimeoutError:
                raise AssertionError("broker neither sent DISCONNECT nor closed the connection") from None
            if p is None or p.type == DISCONNECT:
                return p

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- fixture

class Pool:
    """Clients a test opened, closed at the end of the test (see the ``clients`` fixture)."""

    def __init__(self) -> None:
        self._open: list[V5Client | RawClient] = []

    def v5(self, broker: Any, client_id: str = "", **kwargs: Any) -> V5Client:
        c = V5Client(broker, client_id, **kwargs)
        self._open.append(c)
        return c

    def v311(self, broker: Any, client_id: str = "", **kwargs: Any) -> V5Client:
        return self.v5(broker, client_id, protocol=mqtt.MQTTv311, **kwargs)

    def raw(self, broker: Any, version: int = 5) -> RawClient:
        c = RawClient(broker, version)
        self._open.append(c)
        return c

    def close_all(self) -> None:
        for c in reversed(self._open):
            c.close()
        self._open.clear()


@pytest.fixture
def clients() -> Iterator[Pool]:
    """Import into a test module (``from tests.integration.v5client import clients``)."""
    pool = Pool()
    try:
        yield pool
    finally:
        pool.close_all()
