"""A tiny raw-socket MQTT client for black-box protocol tests.

Everything here is hand-built bytes: it deliberately shares no code with shoal's
codec (``shards.protocol``), so a bug there cannot hide itself in the tests. It
can send anything, including what a real client never would, and it reads the
broker's answer packet by packet with a deadline, telling a clean EOF (the broker
closed the connection) from a timeout (the broker said nothing).

Only what the tests need is decoded: fixed headers, CONNACK, DISCONNECT, SUBACK,
PUBLISH and MQTT 5 properties.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

# Packet types (high nibble of the first byte).
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)

NAMES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
         7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
         12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH", 0: "RESERVED0"}

# MQTT 5 property ids used by the tests, and how each is encoded.
P_PAYLOAD_FORMAT, P_MESSAGE_EXPIRY, P_CONTENT_TYPE, P_RESPONSE_TOPIC = 0x01, 0x02, 0x03, 0x08
P_CORRELATION, P_SUB_ID, P_SESSION_EXPIRY, P_ASSIGNED_ID = 0x09, 0x0B, 0x11, 0x12
P_SERVER_KEEP_ALIVE, P_AUTH_METHOD, P_AUTH_DATA, P_REQ_PROBLEM = 0x13, 0x15, 0x16, 0x17
P_WILL_DELAY, P_REQ_RESPONSE, P_RESPONSE_INFO, P_SERVER_REF = 0x18, 0x19, 0x1A, 0x1C
P_REASON_STRING, P_RECEIVE_MAX, P_TOPIC_ALIAS_MAX, P_TOPIC_ALIAS = 0x1F, 0x21, 0x22, 0x23
P_MAX_QOS, P_RETAIN_AVAILABLE, P_USER_PROPERTY, P_MAX_PACKET_SIZE = 0x24, 0x25, 0x26, 0x27
P_WILDCARD_AVAILABLE, P_SUB_ID_AVAILABLE, P_SHARED_AVAILABLE = 0x28, 0x29, 0x2A

_BYTE = {P_PAYLOAD_FORMAT, P_REQ_PROBLEM, P_REQ_RESPONSE, P_MAX_QOS, P_RETAIN_AVAILABLE,
         P_WILDCARD_AVAILABLE, P_SUB_ID_AVAILABLE, P_SHARED_AVAILABLE}
_U16 = {P_SERVER_KEEP_ALIVE, P_RECEIVE_MAX, P_TOPIC_ALIAS_MAX, P_TOPIC_ALIAS}
_U32 = {P_MESSAGE_EXPIRY, P_SESSION_EXPIRY, P_WILL_DELAY, P_MAX_PACKET_SIZE}
_STR = {P_CONTENT_TYPE, P_RESPONSE_TOPIC, P_ASSIGNED_ID, P_AUTH_METHOD, P_RESPONSE_INFO,
        P_SERVER_REF, P_REASON_STRING}
_BIN = {P_CORRELATION, P_AUTH_DATA}


class RawTimeout(AssertionError):
    """The broker neither sent a packet nor closed the connection in time."""


class RawEOF(AssertionError):
    """The broker closed the connection while a packet was expected."""


# --------------------------------------------------------------------- encoding

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def u16(n: int) -> bytes:
    return struct.pack("!H", n)


def u32(n: int) -> bytes:
    return struct.pack("!I", n)


def mqtt_str(s: str | bytes) -> bytes:
    """A length-prefixed string; bytes are sent as they are (for invalid UTF-8)."""
    raw = s.encode() if isinstance(s, str) else s
    return u16(len(raw)) + raw


def props(items: list[tuple[int, Any]] | None = None) -> bytes:
    """MQTT 5 properties (length-prefixed); ``items`` is a list of (id, value)."""
    body = bytearray()
    for pid, value in items or []:
        body += varint(pid)
        if pid == P_USER_PROPERTY:
            body += mqtt_str(value[0]) + mqtt_str(value[1])
        elif pid == P_SUB_ID:
            body += varint(value)
        elif pid in _BYTE:
            body.append(value)
        elif pid in _U16:
            body += u16(value)
        elif pid in _U32:
            body += u32(value)
        elif pid in _STR:
            body += mqtt_str(value)
        elif pid in _BIN:
            body += u16(len(value)) + value
        else:
            raise ValueError(f"unknown property {pid:#x}")
    return varint(len(body)) + bytes(body)


def packet(first: int, body: bytes) -> bytes:
    """A whole packet: the first byte, the remaining length, the body."""
    return bytes([first]) + varint(len(body)) + body


def connect(client_id: str | bytes = "", version: int = 4, clean: bool = True, keepalive: int = 60,
            properties: list[tuple[int, Any]] | None = None, will: tuple[str, bytes] | None = None,
            will_qos: int = 0, will_retain: bool = False,
            will_properties: list[tuple[int, Any]] | None = None,
            username: str | None = None, password: bytes | None = None,
            protocol_name: bytes | None = None, flags: int | None = None) -> bytes:
    """A CONNECT. ``version`` 3 = MQTT 3.1 ("MQIsdp"), 4 = 3.1.1, 5 = 5.0.

    ``flags`` overrides the computed connect-flags byte (to set reserved bits).
    """
    name = protocol_name if protocol_name is not None else (b"MQIsdp" if version == 3 else b"MQTT")
    computed = (0x02 if clean else 0)
    if will is not None:
        computed |= 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)
    if password is not None:
        computed |= 0x40
    if username is not None:
        computed |= 0x80
    body = mqtt_str(name) + bytes([version, computed if flags is None else flags]) + u16(keepalive)
    if version == 5:
        body += props(properties)
    body += mqtt_str(client_id)
    if will is not None:
        if version == 5:
            body += props(will_properties)
        body += mqtt_str(will[0]) + u16(len(will[1])) + will[1]
    if username is not None:
        body += mqtt_str(username)
    if password is not None:
        body += u16(len(password)) + password
    return packet(0x10, body)


def publish(topic: str | bytes, payload: bytes = b"", qos: int = 0, retain: bool = False,
            dup: bool = False, packet_id: int | None = None, version: int = 4,
            properties: list[tuple[int, Any]] | None = None) -> bytes:
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = mqtt_str(topic)
    if qos:
        body += u16(packet_id if packet_id is not None else 1)
    if version == 5:
        body += props(properties)
    return packet(first, body + payload)


def subscribe(packet_id: int, filters: list[tuple[str | bytes, int]], version: int = 4,
              properties: list[tuple[int, Any]] | None = None, first: int = 0x82) -> bytes:
    """SUBSCRIBE; each filter is (topic filter, options byte: QoS and v5 flags)."""
    body = u16(packet_id) + (props(properties) if version == 5 else b"")
    for topic, options in filters:
        body += mqtt_str(topic) + bytes([options])
    return packet(first, body)


def ack(kind: int, packet_id: int, version: int = 4, reason: int = 0) -> bytes:
    """PUBACK/PUBREC/PUBREL/PUBCOMP."""
    first = (kind << 4) | (0x02 if kind == PUBREL else 0)
    body = u16(packet_id)
    if version == 5 and reason:
        body += bytes([reason])
    return packet(first, body)


def disconnect(version: int = 4, reason: int = 0) -> bytes:
    if version == 5 and reason:
        return packet(0xE0, bytes([reason, 0]))
    return b"\xe0\x00"


PINGREQ_BYTES = b"\xc0\x00"


# --------------------------------------------------------------------- decoding

@dataclass
class Packet:
    first: int
    body: bytes

    @property
    def type(self) -> int:
        return self.first >> 4

    @property
    def flags(self) -> int:
        return self.first & 0x0F

    @property
    def name(self) -> str:
        return NAMES.get(self.type, f"type{self.type}")

    def __repr__(self) -> str:
        return f"<{self.name} flags={self.flags:#x} body={self.body.hex()}>"


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, mult = 0, 1
    for i in range(4):
        byte = data[pos + i]
        value += (byte & 0x7F) * mult
        if not byte & 0x80:
            return value, pos + i + 1
        mult *= 128
    raise ValueError("variable byte integer longer than 4 bytes")


def read_str(data: bytes, pos: int) -> tuple[str, int]:
    n = struct.unpack_from("!H", data, pos)[0]
    return data[pos + 2:pos + 2 + n].decode(), pos + 2 + n


def parse_props(data: bytes, pos: int) -> tuple[dict[int, Any], int]:
    """Decode MQTT 5 properties; user properties and subscription ids are lists."""
    length, pos = read_varint(data, pos)
    end = pos + length
    out: dict[int, Any] = {}
    while pos < end:
        pid, pos = read_varint(data, pos)
        if pid == P_USER_PROPERTY:
            key, pos = read_str(data, pos)
            value, pos = read_str(data, pos)
            out.setdefault(pid, []).append((key, value))
        elif pid == P_SUB_ID:
            sub_id, pos = read_varint(data, pos)
            out.setdefault(pid, []).append(sub_id)
        elif pid in _BYTE:
            out[pid] = data[pos]
            pos += 1
        elif pid in _U16:
            out[pid] = struct.unpack_from("!H", data, pos)[0]
            pos += 2
        elif pid in _U32:
            out[pid] = struct.unpack_from("!I", data, pos)[0]
            pos += 4
        elif pid in _STR:
            out[pid], pos = read_str(data, pos)
        elif pid in _BIN:
            n = struct.unpack_from("!H", data, pos)[0]
            out[pid] = data[pos + 2:pos + 2 + n]
            pos += 2 + n
        else:
            raise ValueError(f"unknown property id {pid:#x} in {data.hex()}")
    if pos != end:
        raise ValueError("properties overran their length")
    return out, end


@dataclass
class Connack:
    session_present: bool
    code: int
    properties: dict[int, Any] = field(default_factory=dict)


def parse_connack(p: Packet, version: int) -> Connack:
    assert p.type == CONNACK, f"expected CONNACK, got {p!r}"
    props_: dict[int, Any] = {}
    if version == 5 and len(p.body) > 2:
        props_, _ = parse_props(p.body, 2)
    return Connack(bool(p.body[0] & 1), p.body[1], props_)


@dataclass
class Publish:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None
    properties: dict[int, Any]


def parse_publish(p: Packet, version: int) -> Publish:
    assert p.type == PUBLISH, f"expected PUBLISH, got {p!r}"
    qos = (p.flags >> 1) & 3
    topic, pos = read_str(p.body, 0)
    pid = None
    if qos:
        pid = struct.unpack_from("!H", p.body, pos)[0]
        pos += 2
    properties: dict[int, Any] = {}
    if version == 5:
        properties, pos = parse_props(p.body, pos)
    return Publish(topic, p.body[pos:], qos, bool(p.flags & 1), bool(p.flags & 8), pid, properties)


def disconnect_reason(p: Packet) -> int:
    """The reason code of a DISCONNECT (0 when the body is empty)."""
    assert p.type == DISCONNECT, f"expected DISCONNECT, got {p!r}"
    return p.body[0] if p.body else 0


# --------------------------------------------------------------------- the client

class RawClient:
    """A blocking socket plus a read buffer; every read has a deadline."""

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.buf = bytearray()
        self.eof = False
        self.version = 4

    # context manager: always close our end
    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def try_send(self, data: bytes) -> bool:
        """Send, but tolerate the broker having closed already (returns False)."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            return False

    def _fill(self, deadline: float) -> bool:
        """Read more bytes into the buffer; False on EOF. Raises RawTimeout."""
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RawTimeout("no data from the broker in time")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise RawTimeout("no data from the broker in time") from None
        except (ConnectionResetError, ConnectionAbortedError):
            chunk = b""  # a reset is a close as far as the tests are concerned
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def _try_parse(self) -> Packet | None:
        if len(self.buf) < 2:
            return None
        value, mult, pos = 0, 1, 1
        while True:
            if pos >= len(self.buf):
                return None
            byte = self.buf[pos]
            value += (byte & 0x7F) * mult
            pos += 1
            if not byte & 0x80:
                break
            mult *= 128
            if pos > 4:
                raise AssertionError(f"broker sent a malformed remaining length: {self.buf[:8].hex()}")
        if len(self.buf) < pos + value:
            return None
        p = Packet(self.buf[0], bytes(self.buf[pos:pos + value]))
        del self.buf[:pos + value]
        return p

    def read(self, timeout: float | None = None) -> Packet | None:
        """The next packet, or None on EOF. Raises RawTimeout if nothing comes."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            p = self._try_parse()
            if p is not None:
                return p
            if not self._fill(deadline):
                if self.buf:
                    raise AssertionError(f"EOF inside a packet: {self.buf.hex()}")
                return None

    def expect(self, ptype: int, timeout: float | None = None, skip: tuple[int, ...] = ()) -> Packet:
        """The next packet, which must be of ``ptype`` (types in ``skip`` are passed over)."""
        while True:
            p = self.read(timeout)
            if p is None:
                raise RawEOF(f"connection closed while waiting for {NAMES[ptype]}")
            if p.type in skip:
                continue
            assert p.type == ptype, f"expected {NAMES[ptype]}, got {p!r}"
            return p

    def packets_until_eof(self, timeout: float | None = None) -> list[Packet]:
        """Everything the broker sends until it closes; RawTimeout if it never closes."""
        out: list[Packet] = []
        while True:
            try:
                p = self.read(timeout)
            except RawTimeout:
                raise RawTimeout(f"the broker did not close the connection within "
                                 f"{self.timeout if timeout is None else timeout}s; "
                                 f"it sent {out}") from None
            if p is None:
                return out
            out.append(p)

    def expect_eof(self, timeout: float | None = None) -> None:
        """The broker closes the connection without sending anything more."""
        packets = self.packets_until_eof(timeout)
        assert not packets, f"expected the broker to close silently, it sent {packets}"

    def expect_disconnect_then_eof(self, reason: int | tuple[int, ...],
                                   timeout: float | None = None) -> Packet:
        """A v5 DISCONNECT with exactly ``reason`` (or one of several), then EOF."""
        allowed = (reason,) if isinstance(reason, int) else tuple(reason)
        want = " or ".join(f"{r:#04x}" for r in allowed)
        p = self.read(timeout)
        if p is None:
            raise RawEOF(f"broker closed without a DISCONNECT (expected reason {want})")
        assert p.type == DISCONNECT, f"expected DISCONNECT {want}, got {p!r}"
        assert disconnect_reason(p) in allowed, \
            f"DISCONNECT reason {disconnect_reason(p):#04x}, expected {want} ({p!r})"
        rest = self.packets_until_eof(timeout)
        assert not rest, f"broker sent packets after DISCONNECT: {rest}"
        return p

    # ---- convenience for well-behaved exchanges

    def connect(self, client_id: str, version: int = 4, timeout: float | None = None,
                **kw: Any) -> Connack:
        self.version = version
        self.send(connect(client_id, version=version, **kw))
        ack_ = parse_connack(self.expect(CONNACK, timeout), version)
        assert ack_.code == 0, f"CONNACK refused: {ack_}"
        return ack_

    def subscribe(self, topic: str, qos: int = 0, packet_id: int = 1,
                  options: int | None = None) -> list[int]:
        self.send(subscribe(packet_id, [(topic, qos if options is None else options)],
                            version=self.version))
        p = self.expect(SUBACK)
        assert struct.unpack_from("!H", p.body, 0)[0] == packet_id
        pos = 2
        if self.version == 5:
            _, pos = parse_props(p.body, pos)
        codes = list(p.body[pos:])
        assert all(c < 0x80 for c in codes), f"SUBACK refused: {codes}"
        return codes

    def ping(self, timeout: float | None = None) -> None:
        self.send(PINGREQ_BYTES)
        self.expect(PINGRESP, timeout, skip=(PUBLISH,))

    def next_publish(self, timeout: float | None = None) -> Publish:
        return parse_publish(self.expect(PUBLISH, timeout), self.version)
