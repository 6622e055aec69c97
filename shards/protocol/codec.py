"""Bytes <-> packet objects for MQTT 3.1, 3.1.1 and 5.0.

``decode`` turns one frame (as cut by :class:`shards.protocol.reader.FrameReader`)
into a packet object and is strict: every violation the spec lets a receiver
detect from the bytes alone raises :class:`ProtocolError` with the reason code
the MQTT 5 spec names (0x81 where it says "Malformed Packet", 0x82 where it says
"Protocol Error"). It never raises anything else, because whatever a peer sends
must end in one orderly CONNACK/DISCONNECT, never in a traceback in the loop.

What needs connection state (topic-alias resolution, receive maximum, a second
CONNECT, ids that are not in flight, payload-format checks, ACL) is not decided
here; the connection layer does it with the decoded object.

``encode`` writes a packet for a given protocol level and silently drops what
that level cannot carry, so the broker can hold one version-neutral object.
``encode_publish`` is the hot path and skips the object altogether.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from .errors import ProtocolError, Reason, malformed, protocol_error, v3_connack_code
from .packets import (
    AUTH, BINARY, BYTE, CONNACK, CONNECT, DISCONNECT, FOUR, MQTT_5, PINGREQ, PINGRESP,
    PROPERTY_TABLE, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, SUBACK, SUBSCRIBE, TWO, UNSUBACK,
    UNSUBSCRIBE, UTF8, VARINT, WILL, Auth, Connack, Connect, Disconnect, Packet, Pingreq, Pingresp,
    Prop, Properties, Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback, Subscribe, SubOptions,
    Unsuback, Unsubscribe, Will, _Ack,
)

__all__ = ["encode", "encode_publish", "decode", "encode_remaining_length", "connect_protocol_level",
           "MAX_REMAINING_LENGTH"]

# Four 7-bit groups (spec 1.5.5).
MAX_REMAINING_LENGTH = 268_435_455

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_pack_u16 = _U16.pack
_pack_u32 = _U32.pack
_unpack_u32 = _U32.unpack_from
_pack_hdr1_u16 = struct.Struct(">BBH").pack  # byte0, 1-byte remaining length, u16
_pack_hdr2_u16 = struct.Struct(">BBBH").pack  # byte0, 2-byte remaining length, u16
_pack_u16_u8 = struct.Struct(">HB").pack

_ONE_BYTE = [bytes((i,)) for i in range(256)]

# ---------------------------------------------------------------------------
# Variable byte integers
# ---------------------------------------------------------------------------


def encode_remaining_length(n: int) -> bytes:
    """The variable byte integer encoding of ``n`` (spec 1.5.5)."""
    if 0 <= n < 0x80:
        return _ONE_BYTE[n]
    if 0 < n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    if n < 0 or n > MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length {n} out of range")
    out = bytearray()
    while n > 127:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_encode_varint = encode_remaining_length


def _read_varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    value = 0
    shift = 0
    for _ in range(4):
        if pos >= end:
            raise malformed("truncated variable byte integer")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
    raise malformed("variable byte integer longer than 4 bytes")  # spec 1.5.5


# ---------------------------------------------------------------------------
# Strings and binary data
# ---------------------------------------------------------------------------


def _enc_str(s: str) -> bytes:
    b = s.encode()
    return _pack_u16(len(b)) + b


def _enc_bin(b: bytes) -> bytes:
    return _pack_u16(len(b)) + bytes(b)


def _read_str(buf: Any, pos: int, end: int) -> tuple[str, int]:
    if pos + 2 > end:
        raise malformed("string length past the end of the packet")
    stop = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
    if stop > end:
        raise malformed("string longer than the packet")
    try:
        s = str(buf[pos + 2:stop], "utf-8")
    except UnicodeDecodeError:
        raise malformed("ill-formed UTF-8 string") from None  # [MQTT-1.5.4-1]
    if "\x00" in s:
        raise malformed("U+0000 in a UTF-8 string")  # [MQTT-1.5.4-2]
    return s, stop


def _read_bin(buf: Any, pos: int, end: int) -> tuple[bytes, int]:
    if pos + 2 > end:
        raise malformed("binary length past the end of the packet")
    stop = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
    if stop > end:
        raise malformed("binary data longer than the packet")
    return bytes(buf[pos + 2:stop]), stop


def _read_u16(buf: Any, pos: int, end: int) -> int:
    if pos + 2 > end:
        raise malformed("truncated two byte integer")
    value: int = (buf[pos] << 8) | buf[pos + 1]
    return value


def _read_packet_id(buf: Any, pos: int, end: int) -> int:
    pid = _read_u16(buf, pos, end)
    if pid == 0:
        raise protocol_error("packet identifier 0")  # [MQTT-2.2.1-3]
    return pid


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

_PROP_KIND: dict[int, str] = {pid: kind for pid, (kind, _) in PROPERTY_TABLE.items()}

# Properties whose only legal values are 0 and 1; anything else is a Protocol
# Error (spec 3.1.2.11.6/7, 3.2.2.3.4/5/11/12/13). The payload format indicator
# has no stated consequence; treating it alike keeps one rule.
_BOOLEAN_PROPS = frozenset({
    Prop.PAYLOAD_FORMAT_INDICATOR, Prop.REQUEST_PROBLEM_INFORMATION,
    Prop.REQUEST_RESPONSE_INFORMATION, Prop.MAXIMUM_QOS, Prop.RETAIN_AVAILABLE,
    Prop.WILDCARD_SUBSCRIPTION_AVAILABLE, Prop.SUBSCRIPTION_IDENTIFIER_AVAILABLE,
    Prop.SHARED_SUBSCRIPTION_AVAILABLE,
})
# Properties for which 0 is a Protocol Error (spec 3.1.2.11.3, 3.1.2.11.4, 3.3.2.3.4, 3.8.2.1.2).
_NONZERO_PROPS = frozenset({
    Prop.RECEIVE_MAXIMUM, Prop.MAXIMUM_PACKET_SIZE, Prop.TOPIC_ALIAS, Prop.SUBSCRIPTION_IDENTIFIER,
})

_EMPTY_PROPS = b"\x00"


def _encode_props(props: Properties | None) -> bytes:
    """Property length + properties, in ascending id order so equal dicts encode equally."""
    if not props:
        return _EMPTY_PROPS
    parts: list[bytes] = []
    append = parts.append
    for pid in sorted(props):
        value = props[pid]
        kind = _PROP_KIND[pid]
        head = _ONE_BYTE[pid]
        if kind is BYTE:
            append(head + _ONE_BYTE[value])
        elif kind is TWO:
            append(head + _pack_u16(value))
        elif kind is FOUR:
            append(head + _pack_u32(value))
        elif kind is UTF8:
            append(head + _enc_str(value))
        elif kind is BINARY:
            append(head + _enc_bin(value))
        elif kind is VARINT:
            for v in (value if isinstance(value, list) else (value,)):
                append(head + _encode_varint(v))
        else:  # PAIR: the order of user properties is significant [MQTT-3.3.2-18]
            for k, v in value:
                append(head + _enc_str(k) + _enc_str(v))
    body = b"".join(parts)
    return _encode_varint(len(body)) + body


def _decode_props(buf: Any, pos: int, end: int, ptype: int) -> tuple[Properties, int]:
    """Read property length + properties at ``pos``; return them and the position after."""
    length, pos = _read_varint(buf, pos, end)
    stop = pos + length
    if stop > end:
        raise malformed("property length exceeds the packet")
    props: Properties = {}
    while pos < stop:
        # The identifier is a variable byte integer, but every defined id is < 0x80,
        # so a first byte >= 0x80 is an unknown id whichever way it continues.
        pid = buf[pos]
        pos += 1
        entry = PROPERTY_TABLE.get(pid)
        if entry is None:
            raise malformed(f"unknown property 0x{pid:02X}")  # spec 2.2.2.2
        kind, allowed = entry
        if ptype not in allowed:
            raise malformed(f"property 0x{pid:02X} not allowed in this packet")  # spec 2.2.2.2
        value: Any
        if kind is BYTE:
            if pos >= stop:
                raise malformed("truncated property")
            value = buf[pos]
            pos += 1
        elif kind is TWO:
            if pos + 2 > stop:
                raise malformed("truncated property")
            value = (buf[pos] << 8) | buf[pos + 1]
            pos += 2
        elif kind is FOUR:
            if pos + 4 > stop:
                raise malformed("truncated property")
            value = _unpack_u32(buf, pos)[0]
            pos += 4
        elif kind is VARINT:
            value, pos = _read_varint(buf, pos, stop)
        elif kind is UTF8:
            value, pos = _read_str(buf, pos, stop)
        elif kind is BINARY:
            value, pos = _read_bin(buf, pos, stop)
        else:  # PAIR
            k, pos = _read_str(buf, pos, stop)
            v, pos = _read_str(buf, pos, stop)
            pairs = props.get(pid)
            if pairs is None:
                props[pid] = [(k, v)]
            else:
                pairs.append((k, v))
            continue
        if pid in _NONZERO_PROPS and value == 0:
            raise protocol_error(f"property 0x{pid:02X} has the value 0")
        if pid in _BOOLEAN_PROPS and value > 1:
            raise protocol_error(f"property 0x{pid:02X} must be 0 or 1")
        if pid == Prop.SUBSCRIPTION_IDENTIFIER and ptype == PUBLISH:
            # A delivered PUBLISH carries one id per matching subscription (spec 3.3.2.3.8).
            ids = props.get(pid)
            if ids is None:
                props[pid] = [value]
            else:
                ids.append(value)
            continue
        if pid in props:
            raise protocol_error(f"property 0x{pid:02X} included more than once")
        props[pid] = value
    return props, stop


# ---------------------------------------------------------------------------
# Reason codes each v5 packet may carry (spec 2.4 and the per-packet tables).
# A code outside its packet's table cannot be interpreted: Malformed.
# ---------------------------------------------------------------------------

_CONNACK_CODES = frozenset({0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A,
                            0x8C, 0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F})
_PUBACK_CODES = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})
_PUBREL_CODES = frozenset({0x00, 0x92})
_SUBACK_CODES = frozenset({0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2})
_UNSUBACK_CODES = frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91})
_DISCONNECT_CODES = frozenset({0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E,
                               0x8F, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B,
                               0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2})
_AUTH_CODES = frozenset({0x00, 0x18, 0x19})

_ACK_CODES = {PUBACK: _PUBACK_CODES, PUBREC: _PUBACK_CODES, PUBREL: _PUBREL_CODES,
              PUBCOMP: _PUBREL_CODES}

# v3 SUBACK return codes (3.1.1 spec 3.9.3).
_V3_SUBACK_CODES = frozenset({0x00, 0x01, 0x02, 0x80})

# v3 CONNACK return code -> the v5 reason code a Connack holds (inverse of errors.v3_connack_code).
_V3_CONNACK_TO_V5 = {
    0: Reason.SUCCESS, 1: Reason.UNSUPPORTED_PROTOCOL_VERSION, 2: Reason.CLIENT_IDENTIFIER_NOT_VALID,
    3: Reason.SERVER_UNAVAILABLE, 4: Reason.BAD_USER_NAME_OR_PASSWORD, 5: Reason.NOT_AUTHORIZED,
}

# Required low nibble of byte 0 per packet type (spec 2.1.3); PUBLISH carries flags instead.
# Index 0 (reserved type) is never consulted: decode rejects type 0 first.
_FIXED_FLAGS = (0, 0, 0, -1, 0, 0, 2, 0, 2, 0, 2, 0, 0, 0, 0, 0)


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


def _frame(byte0: int, body: bytes) -> bytes:
    n = len(body)
    if n < 128:
        return _ONE_BYTE[byte0] + _ONE_BYTE[n] + body
    return _ONE_BYTE[byte0] + encode_remaining_length(n) + body


def encode_publish(topic: str, payload: bytes, qos: int, retain: bool, dup: bool, packet_id: int,
                   props: Properties | bytes | None, version: int) -> bytes:
    """One PUBLISH on the wire. ``packet_id`` is ignored for QoS 0.

    Called for every delivery, so the fixed header, the topic length and (for
    QoS > 0) the packet id are packed by one struct call per case and the frame
    is assembled with a single join. ``props`` is a dict, or an already-encoded
    property block (length + properties, as :func:`encode_properties` makes it):
    the broker passes blocks, so a message's properties are encoded once, not
    once per delivery, and a forwarded message's block is spliced in unparsed.
    """
    t = topic.encode()
    tlen = len(t)
    byte0 = 0x30 | (qos << 1)
    if retain:
        byte0 |= 0x01
    if dup:
        byte0 |= 0x08
    if version == MQTT_5:
        if props.__class__ is bytes:
            pb = props
        else:
            pb = _encode_props(props) if props else _EMPTY_PROPS  # type: ignore[arg-type]
        rl = tlen + 2 + len(pb) + len(payload)
    else:
        pb = b""
        rl = tlen + 2 + len(payload)
    if qos:
        rl += 2
        if rl < 0x80:
            return b"".join((_pack_hdr1_u16(byte0, rl, tlen), t, _pack_u16(packet_id), pb, payload))
        if rl < 0x4000:
            return b"".join((_pack_hdr2_u16(byte0, (rl & 0x7F) | 0x80, rl >> 7, tlen), t,
                             _pack_u16(packet_id), pb, payload))
        return b"".join((_ONE_BYTE[byte0], encode_remaining_length(rl), _pack_u16(tlen), t,
                         _pack_u16(packet_id), pb, payload))
    if rl < 0x80:
        return b"".join((_pack_hdr1_u16(byte0, rl, tlen), t, pb, payload))
    if rl < 0x4000:
        return b"".join((_pack_hdr2_u16(byte0, (rl & 0x7F) | 0x80, rl >> 7, tlen), t, pb, payload))
    return b"".join((_ONE_BYTE[byte0], encode_remaining_length(rl), _pack_u16(tlen), t, pb, payload))


def _enc_publish(p: Publish, version: int) -> bytes:
    return encode_publish(p.topic, p.payload, p.qos, p.retain, p.dup, p.packet_id, p.props, version)


def _enc_connect(p: Connect, version: int) -> bytes:
    # Name and level are written as the packet holds them (so tests can craft odd
    # CONNECTs); ``version`` decides the layout.
    v5 = version == MQTT_5
    flags = 0x02 if p.clean_start else 0
    w = p.will
    if w is not None:
        flags |= 0x04 | (w.qos << 3) | (0x20 if w.retain else 0)
    if p.password is not None:
        flags |= 0x40
    if p.username is not None:
        flags |= 0x80
    parts = [_enc_str(p.protocol_name), bytes((p.protocol_level, flags)), _pack_u16(p.keepalive)]
    if v5:
        parts.append(_encode_props(p.props))
    parts.append(_enc_str(p.client_id))
    if w is not None:
        if v5:
            parts.append(_encode_props(w.props))
        parts.append(_enc_str(w.topic))
        parts.append(_enc_bin(w.payload))
    if p.username is not None:
        parts.append(_enc_str(p.username))
    if p.password is not None:
        parts.append(_enc_bin(p.password))
    return _frame(0x10, b"".join(parts))


def _enc_connack(p: Connack, version: int) -> bytes:
    rc = p.reason_code
    # A refused connection never claims a session [MQTT-3.2.2-4] [MQTT-3.2.2-6].
    sp = 1 if p.session_present and rc == 0 else 0
    if version == MQTT_5:
        return _frame(0x20, bytes((sp, rc)) + _encode_props(p.props))
    if version == 3:
        sp = 0  # MQTT 3.1 has no session-present flag
    return bytes((0x20, 2, sp, v3_connack_code(rc)))


def _enc_ack(p: _Ack, version: int) -> bytes:
    byte0 = 0x62 if p.type == PUBREL else p.type << 4
    if version == MQTT_5 and (p.reason_code or p.props):
        body = _pack_u16_u8(p.packet_id, p.reason_code)
        if p.props:
            body += _encode_props(p.props)
        return _frame(byte0, body)
    return _pack_hdr1_u16(byte0, 2, p.packet_id)


def _enc_subscribe(p: Subscribe, version: int) -> bytes:
    v5 = version == MQTT_5
    parts = [_pack_u16(p.packet_id)]
    if v5:
        parts.append(_encode_props(p.props))
    for filt, o in p.topics:
        parts.append(_enc_str(filt))
        if v5:
            parts.append(_ONE_BYTE[o.qos | (o.no_local << 2) | (o.retain_as_published << 3)
                                   | (o.retain_handling << 4)])
        else:
            parts.append(_ONE_BYTE[o.qos])
    return _frame(0x82, b"".join(parts))


def _enc_suback(p: Suback, version: int) -> bytes:
    if version == MQTT_5:
        body = _pack_u16(p.packet_id) + _encode_props(p.props) + bytes(p.reason_codes)
    else:
        # v3 knows granted QoS 0-2 and 0x80 "failure" only.
        body = _pack_u16(p.packet_id) + bytes(c if c <= 2 else 0x80 for c in p.reason_codes)
    return _frame(0x90, body)


def _enc_unsubscribe(p: Unsubscribe, version: int) -> bytes:
    parts = [_pack_u16(p.packet_id)]
    if version == MQTT_5:
        parts.append(_encode_props(p.props))
    for filt in p.topics:
        parts.append(_enc_str(filt))
    return _frame(0xA2, b"".join(parts))


def _enc_unsuback(p: Unsuback, version: int) -> bytes:
    if version == MQTT_5:
        return _frame(0xB0, _pack_u16(p.packet_id) + _encode_props(p.props) + bytes(p.reason_codes))
    return _pack_hdr1_u16(0xB0, 2, p.packet_id)  # the v3 UNSUBACK has no payload


def _enc_pingreq(p: Pingreq, version: int) -> bytes:
    return b"\xc0\x00"


def _enc_pingresp(p: Pingresp, version: int) -> bytes:
    return b"\xd0\x00"


def _enc_reason_props(byte0: int, reason_code: int, props: Properties, version: int) -> bytes:
    # DISCONNECT/AUTH: reason code and property length may both be omitted when
    # the code is 0 and there are no properties, and the property length alone
    # when there are no properties (spec 3.14.2.1, 3.15.2.1).
    if version != MQTT_5 or (not reason_code and not props):
        return bytes((byte0, 0))
    if not props:
        return bytes((byte0, 1, reason_code))
    return _frame(byte0, _ONE_BYTE[reason_code] + _encode_props(props))


def _enc_disconnect(p: Disconnect, version: int) -> bytes:
    return _enc_reason_props(0xE0, p.reason_code, p.props, version)


def _enc_auth(p: Auth, version: int) -> bytes:
    if version != MQTT_5:
        raise ValueError("AUTH does not exist before MQTT 5")
    return _enc_reason_props(0xF0, p.reason_code, p.props, version)


_ENCODERS: dict[int, Callable[[Any, int], bytes]] = {
    CONNECT: _enc_connect, CONNACK: _enc_connack, PUBLISH: _enc_publish, PUBACK: _enc_ack,
    PUBREC: _enc_ack, PUBREL: _enc_ack, PUBCOMP: _enc_ack, SUBSCRIBE: _enc_subscribe,
    SUBACK: _enc_suback, UNSUBSCRIBE: _enc_unsubscribe, UNSUBACK: _enc_unsuback,
    PINGREQ: _enc_pingreq, PINGRESP: _enc_pingresp, DISCONNECT: _enc_disconnect, AUTH: _enc_auth,
}


def encode(packet: Packet, version: int) -> bytes:
    """``packet`` as a whole frame for a peer speaking protocol level ``version`` (3, 4 or 5)."""
    return _ENCODERS[packet.type](packet, version)


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------


def _decode_publish(byte0: int, body: Any, version: int) -> Publish:
    # The hot path of decoding: inlined string and id reads, bytes-specific slicing.
    qos = (byte0 >> 1) & 0x03
    if qos == 3:
        raise malformed("PUBLISH with QoS 3")  # [MQTT-3.3.1-4]
    dup = bool(byte0 & 0x08)
    if dup and not qos:
        raise malformed("PUBLISH with DUP set on QoS 0")  # [MQTT-3.3.1-2]
    end = len(body)
    if end < 2:
        raise malformed("truncated PUBLISH topic")
    pos = 2 + ((body[0] << 8) | body[1])
    if pos > end:
        raise malformed("PUBLISH topic longer than the packet")
    is_bytes = type(body) is bytes
    try:
        topic = body[2:pos].decode() if is_bytes else str(body[2:pos], "utf-8")
    except UnicodeDecodeError:
        raise malformed("ill-formed UTF-8 in PUBLISH topic") from None  # [MQTT-1.5.4-1]
    if "\x00" in topic:
        raise malformed("U+0000 in PUBLISH topic")  # [MQTT-1.5.4-2]
    if qos:
        if pos + 2 > end:
            raise malformed("PUBLISH without a packet identifier")
        packet_id = (body[pos] << 8) | body[pos + 1]
        if not packet_id:
            raise protocol_error("PUBLISH with packet identifier 0")  # [MQTT-2.2.1-3]
        pos += 2
    else:
        packet_id = 0
    props: Properties
    wire = None
    if version == MQTT_5:
        if pos < end and body[pos] == 0:
            props = {}
            pos += 1
        else:
            start = pos
            props, pos = _decode_props(body, pos, end, PUBLISH)
            wire = body[start:pos] if is_bytes else bytes(body[start:pos])
    else:
        props = {}
    if topic:
        if "+" in topic or "#" in topic:
            raise ProtocolError(Reason.TOPIC_NAME_INVALID, "wildcard in PUBLISH topic")  # [MQTT-3.3.2-2]
    elif version != MQTT_5 or Prop.TOPIC_ALIAS not in props:
        raise protocol_error("PUBLISH with an empty topic and no topic alias")  # [MQTT-4.7.3-1], 3.3.2.1
    p = Publish(topic, body[pos:] if is_bytes else bytes(body[pos:]), qos, bool(byte0 & 0x01),
                dup, packet_id, props)
    p.wire = wire
    return p


def _check_will_topic(topic: str) -> None:
    # 0x90 is a CONNACK code: "the Will Topic Name is not malformed, but is not accepted".
    if not topic:
        raise ProtocolError(Reason.TOPIC_NAME_INVALID, "empty will topic")  # [MQTT-4.7.3-1]
    if "+" in topic or "#" in topic:
        raise ProtocolError(Reason.TOPIC_NAME_INVALID, "wildcard in will topic")  # [MQTT-3.3.2-2]


def _decode_connect(flags: int, body: Any, version: int) -> Connect:
    end = len(body)
    name, pos = _read_str(body, 0, end)
    if pos >= end:
        raise malformed("CONNECT without a protocol level")
    level = body[pos]
    pos += 1
    if not ((name == "MQTT" and (level == 4 or level == 5)) or (name == "MQIsdp" and level == 3)):
        raise ProtocolError(Reason.UNSUPPORTED_PROTOCOL_VERSION,
                            f"unsupported protocol {name!r} level {level}")  # [MQTT-3.1.2-1/2]
    if pos + 3 > end:
        raise malformed("truncated CONNECT variable header")
    cflags = body[pos]
    keepalive = (body[pos + 1] << 8) | body[pos + 2]
    pos += 3
    if cflags & 0x01:
        raise malformed("CONNECT reserved flag set")  # [MQTT-3.1.2-3]
    has_will = cflags & 0x04
    will_qos = (cflags >> 3) & 0x03
    will_retain = bool(cflags & 0x20)
    if has_will:
        if will_qos == 3:
            raise malformed("will QoS 3")  # [MQTT-3.1.2-12]
    elif will_qos or will_retain:
        raise malformed("will QoS or retain set without the will flag")  # [MQTT-3.1.2-11/13]
    has_password = cflags & 0x40
    has_username = cflags & 0x80
    v5 = level == MQTT_5
    if has_password and not has_username and not v5:
        raise malformed("password flag without user name flag")  # [MQTT-3.1.2-22] (3.1.1)
    if v5:
        props, pos = _decode_props(body, pos, end, CONNECT)
        if Prop.AUTHENTICATION_DATA in props and Prop.AUTHENTICATION_METHOD not in props:
            raise protocol_error("authentication data without authentication method")  # 3.1.2.11.10
    else:
        props = {}
    client_id, pos = _read_str(body, pos, end)
    will = None
    if has_will:
        if v5:
            will_props, pos = _decode_props(body, pos, end, WILL)
        else:
            will_props = {}
        will_topic, pos = _read_str(body, pos, end)
        will_payload, pos = _read_bin(body, pos, end)
        _check_will_topic(will_topic)
        will = Will(will_topic, will_payload, will_qos, will_retain, will_props)
    username = None
    if has_username:
        username, pos = _read_str(body, pos, end)
    password = None
    if has_password:
        password, pos = _read_bin(body, pos, end)
    if pos != end:
        raise malformed("bytes after the end of CONNECT")
    return Connect(client_id, level, bool(cflags & 0x02), keepalive, will, username, password, props,
                   name)


def _decode_connack(flags: int, body: Any, version: int) -> Connack:
    end = len(body)
    if end < 2:
        raise malformed("truncated CONNACK")
    ack, rc = body[0], body[1]
    if version == MQTT_5:
        if ack & 0xFE:
            raise malformed("CONNACK reserved flags set")  # [MQTT-3.2.2-1]
        if rc not in _CONNACK_CODES:
            raise malformed(f"CONNACK reason code 0x{rc:02X}")
        props, pos = _decode_props(body, 2, end, CONNACK)
        if pos != end:
            raise malformed("bytes after the end of CONNACK")
        return Connack(bool(ack & 0x01), rc, props)
    if end != 2:
        raise malformed("CONNACK remaining length is not 2")
    if version == 4 and ack & 0xFE:
        raise malformed("CONNACK reserved flags set")
    reason = _V3_CONNACK_TO_V5.get(rc)
    if reason is None:
        raise malformed(f"CONNACK return code {rc}")
    # 3.1 has no session-present bit (the byte was reserved and is ignored).
    return Connack(version == 4 and bool(ack & 0x01), int(reason))


def _decode_ack(cls: type[_Ack], body: Any, version: int) -> _Ack:
    end = len(body)
    packet_id = _read_packet_id(body, 0, end)
    if end == 2:
        return cls(packet_id)
    if version != MQTT_5:
        raise malformed(f"{cls.__name__.upper()} remaining length is not 2")
    rc = body[2]
    if rc not in _ACK_CODES[cls.type]:
        raise malformed(f"{cls.__name__.upper()} reason code 0x{rc:02X}")
    if end == 3:
        return cls(packet_id, rc)
    props, pos = _decode_props(body, 3, end, cls.type)
    if pos != end:
        raise malformed(f"bytes after the end of {cls.__name__.upper()}")
    return cls(packet_id, rc, props)


def _decode_puback(flags: int, body: Any, version: int) -> _Ack:
    return _decode_ack(Puback, body, version)


def _decode_pubrec(flags: int, body: Any, version: int) -> _Ack:
    return _decode_ack(Pubrec, body, version)


def _decode_pubrel(flags: int, body: Any, version: int) -> _Ack:
    return _decode_ack(Pubrel, body, version)


def _decode_pubcomp(flags: int, body: Any, version: int) -> _Ack:
    return _decode_ack(Pubcomp, body, version)


def _decode_subscribe(flags: int, body: Any, version: int) -> Subscribe:
    end = len(body)
    packet_id = _read_packet_id(body, 0, end)
    v5 = version == MQTT_5
    if v5:
        props, pos = _decode_props(body, 2, end, SUBSCRIBE)
    else:
        props, pos = {}, 2
    if pos == end:
        raise protocol_error("SUBSCRIBE without a topic filter")  # [MQTT-3.8.3-2]
    topics: list[tuple[str, SubOptions]] = []
    while pos < end:
        filt, pos = _read_str(body, pos, end)
        if pos >= end:
            raise malformed("topic filter without subscription options")
        o = body[pos]
        pos += 1
        if not filt:
            raise protocol_error("empty topic filter")  # [MQTT-4.7.3-1]
        if v5:
            if o & 0xC0:
                raise malformed("subscription options reserved bits set")  # [MQTT-3.8.3-5]
            qos = o & 0x03
            if qos == 3:
                raise malformed("subscription QoS 3")  # 3.8.3.1
            rh = (o >> 4) & 0x03
            if rh == 3:
                raise protocol_error("retain handling 3")  # 3.8.3.1
            no_local = bool(o & 0x04)
            if no_local and filt.startswith("$share/"):
                raise protocol_error("no local on a shared subscription")  # [MQTT-3.8.3-4]
            topics.append((filt, SubOptions(qos, no_local, bool(o & 0x08), rh)))
        else:
            if o > 2:
                raise malformed("invalid requested QoS byte")  # 3.1.1 [MQTT-3.8.3-4]
            topics.append((filt, SubOptions(o)))
    return Subscribe(packet_id, topics, props)


def _decode_suback(flags: int, body: Any, version: int) -> Suback:
    end = len(body)
    packet_id = _read_packet_id(body, 0, end)
    if version == MQTT_5:
        props, pos = _decode_props(body, 2, end, SUBACK)
        allowed = _SUBACK_CODES
    else:
        props, pos = {}, 2
        allowed = _V3_SUBACK_CODES
    codes = list(body[pos:end])
    if not codes:
        raise protocol_error("SUBACK without reason codes")
    for c in codes:
        if c not in allowed:
            raise malformed(f"SUBACK reason code 0x{c:02X}")
    return Suback(packet_id, codes, props)


def _decode_unsubscribe(flags: int, body: Any, version: int) -> Unsubscribe:
    end = len(body)
    packet_id = _read_packet_id(body, 0, end)
    if version == MQTT_5:
        props, pos = _decode_props(body, 2, end, UNSUBSCRIBE)
    else:
        props, pos = {}, 2
    if pos == end:
        raise protocol_error("UNSUBSCRIBE without a topic filter")  # [MQTT-3.10.3-2]
    topics: list[str] = []
    while pos < end:
        filt, pos = _read_str(body, pos, end)
        if not filt:
            raise protocol_error("empty topic filter")  # [MQTT-4.7.3-1]
        topics.append(filt)
    return Unsubscribe(packet_id, topics, props)


def _decode_unsuback(flags: int, body: Any, version: int) -> Unsuback:
    end = len(body)
    packet_id = _read_packet_id(body, 0, end)
    if version != MQTT_5:
        if end != 2:
            raise malformed("UNSUBACK remaining length is not 2")
        return Unsuback(packet_id)
    props, pos = _decode_props(body, 2, end, UNSUBACK)
    codes = list(body[pos:end])
    if not codes:
        raise protocol_error("UNSUBACK without reason codes")
    for c in codes:
        if c not in _UNSUBACK_CODES:
            raise malformed(f"UNSUBACK reason code 0x{c:02X}")
    return Unsuback(packet_id, codes, props)


def _decode_pingreq(flags: int, body: Any, version: int) -> Pingreq:
    if len(body):
        raise malformed("PINGREQ with a body")
    return Pingreq()


def _decode_pingresp(flags: int, body: Any, version: int) -> Pingresp:
    if len(body):
        raise malformed("PINGRESP with a body")
    return Pingresp()


def _decode_reason_props(body: Any, version: int, ptype: int, allowed: frozenset[int],
                         name: str) -> tuple[int, Properties]:
    end = len(body)
    if end == 0:
        return 0, {}
    if version != MQTT_5:
        raise malformed(f"{name} with a body")
    rc = body[0]
    if rc not in allowed:
        raise malformed(f"{name} reason code 0x{rc:02X}")
    if end == 1:
        return rc, {}
    props, pos = _decode_props(body, 1, end, ptype)
    if pos != end:
        raise malformed(f"bytes after the end of {name}")
    return rc, props


def _decode_disconnect(flags: int, body: Any, version: int) -> Disconnect:
    rc, props = _decode_reason_props(body, version, DISCONNECT, _DISCONNECT_CODES, "DISCONNECT")
    return Disconnect(rc, props)


def _decode_auth(flags: int, body: Any, version: int) -> Auth:
    if version != MQTT_5:
        raise malformed("packet type 15 is reserved before MQTT 5")
    rc, props = _decode_reason_props(body, version, AUTH, _AUTH_CODES, "AUTH")
    return Auth(rc, props)


def _decode_reserved(flags: int, body: Any, version: int) -> Packet:
    raise malformed("reserved packet type 0")


_DECODERS: tuple[Callable[[int, Any, int], Packet], ...] = (
    _decode_reserved, _decode_connect, _decode_connack, _decode_publish, _decode_puback,
    _decode_pubrec, _decode_pubrel, _decode_pubcomp, _decode_subscribe, _decode_suback,
    _decode_unsubscribe, _decode_unsuback, _decode_pingreq, _decode_pingresp, _decode_disconnect,
    _decode_auth,
)


def decode(first_byte: int, body: bytes | memoryview, version: int) -> Packet:
    """Decode one frame: ``first_byte`` is byte 0 of the fixed header, ``body`` the
    remaining-length bytes. ``version`` is the connection's protocol level, 0
    until CONNECT has been decoded (a CONNECT determines its own level).

    Raises :class:`ProtocolError` and nothing else.
    """
    ptype = first_byte >> 4
    try:
        if ptype == PUBLISH and version:
            return _decode_publish(first_byte, body, version)
        if ptype == 0:
            raise malformed("reserved packet type 0")
        if (first_byte & 0x0F) != _FIXED_FLAGS[ptype] and ptype != PUBLISH:
            raise malformed(f"invalid fixed header flags 0x{first_byte:02X}")  # [MQTT-2.1.3-1]
        if not version and ptype != CONNECT:
            raise protocol_error("the first packet must be CONNECT")  # [MQTT-3.1.0-1]
        return _DECODERS[ptype](first_byte & 0x0F, body, version)
    except ProtocolError:
        raise
    except Exception as exc:  # a bug or an unforeseen shape: still the peer's bytes' fault
        raise malformed(f"undecodable {type(exc).__name__}: {exc}") from exc


def connect_protocol_level(body: bytes | memoryview) -> int:
    """The protocol level byte of a CONNECT body, or 0 if the body is too short to hold one.

    For answering a CONNECT that failed to decode in the format its sender
    understands (a 3.1.1 client gets a 3.1.1 CONNACK), since the failed decode
    never told the connection its version.
    """
    if len(body) < 2:
        return 0
    at = 2 + ((body[0] << 8) | body[1])
    return body[at] if at < len(body) else 0


def encode_properties(props: Properties | None) -> bytes:
    """Property length + properties, as inside a packet: how messages carry their
    MQTT 5 properties between shards and into the store."""
    return _encode_props(props)


def decode_properties(data: bytes | memoryview, ptype: int = PUBLISH) -> Properties:
    """The inverse of :func:`encode_properties` for properties allowed in ``ptype``."""
    props, end = _decode_props(data, 0, len(data), ptype)
    if end != len(data):
        raise malformed("bytes after the properties")
    return props


def splice_properties(block: bytes | None, entries: bytes) -> bytes:
    """A property block with ``entries`` (encoded properties, no length) put in front.

    How per-delivery properties (Subscription Identifier, Message Expiry Interval, Topic
    Alias) join a message's block without decoding it: MQTT fixes no order between
    properties, only among user properties [MQTT-3.3.2-18], and those stay as they were.
    ``block`` None means the message has no properties.
    """
    if not block or block == _EMPTY_PROPS:
        return _encode_varint(len(entries)) + entries
    length, pos = _read_varint(block, 0, len(block))
    return b"".join((_encode_varint(length + len(entries)), entries, block[pos:]))


def subscription_ids_entries(ids: tuple[int, ...] | list[int]) -> bytes:
    """Subscription Identifier properties, one per id, for :func:`splice_properties`."""
    head = _ONE_BYTE[Prop.SUBSCRIPTION_IDENTIFIER]
    if len(ids) == 1:
        return head + _encode_varint(ids[0])
    return b"".join(head + _encode_varint(i) for i in ids)


def expiry_entry(seconds: int) -> bytes:
    """A Message Expiry Interval property, for :func:`splice_properties`."""
    return b"\x02" + _pack_u32(seconds)


def topic_alias_entry(alias: int) -> bytes:
    """A Topic Alias property, for :func:`splice_properties`."""
    return b"\x23" + _pack_u16(alias)
