"""MQTT control packets as plain objects, and the MQTT 5 property table.

Packets are version-neutral: the same ``Publish`` is encoded for a 3.1.1 or a
5.0 peer by :mod:`shards.protocol.codec`, which drops what the older version
cannot carry. Properties are a ``dict[int, value]`` keyed by property id
(``Prop.*``) because most of them are passed through untouched; the two that may
repeat are lists: ``USER_PROPERTY`` is ``list[tuple[str, str]]`` and
``SUBSCRIPTION_IDENTIFIER`` (in PUBLISH) is ``list[int]``.

Classes use ``__slots__`` and plain ``__init__``: a PUBLISH is built for every
message on the hot path, and dataclass machinery costs there.
"""

from __future__ import annotations

from typing import Any

# Fixed-header packet types (high nibble of byte 0).
CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14
AUTH = 15

PACKET_NAMES = {
    CONNECT: "CONNECT", CONNACK: "CONNACK", PUBLISH: "PUBLISH", PUBACK: "PUBACK",
    PUBREC: "PUBREC", PUBREL: "PUBREL", PUBCOMP: "PUBCOMP", SUBSCRIBE: "SUBSCRIBE",
    SUBACK: "SUBACK", UNSUBSCRIBE: "UNSUBSCRIBE", UNSUBACK: "UNSUBACK", PINGREQ: "PINGREQ",
    PINGRESP: "PINGRESP", DISCONNECT: "DISCONNECT", AUTH: "AUTH",
}

# Protocol levels as carried in CONNECT.
MQTT_31 = 3
MQTT_311 = 4
MQTT_5 = 5

Properties = dict[int, Any]


class Prop:
    """MQTT 5 property identifiers (spec 2.2.2.2)."""

    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


# Property value types on the wire.
BYTE = "byte"
TWO = "u16"
FOUR = "u32"
VARINT = "varint"
UTF8 = "utf8"
BINARY = "binary"
PAIR = "pair"

# A pseudo packet type for the will properties inside CONNECT.
WILL = 0

# id -> (wire type, packet types it may appear in). Spec table 2-4.
PROPERTY_TABLE: dict[int, tuple[str, frozenset[int]]] = {
    Prop.PAYLOAD_FORMAT_INDICATOR: (BYTE, frozenset({PUBLISH, WILL})),
    Prop.MESSAGE_EXPIRY_INTERVAL: (FOUR, frozenset({PUBLISH, WILL})),
    Prop.CONTENT_TYPE: (UTF8, frozenset({PUBLISH, WILL})),
    Prop.RESPONSE_TOPIC: (UTF8, frozenset({PUBLISH, WILL})),
    Prop.CORRELATION_DATA: (BINARY, frozenset({PUBLISH, WILL})),
    Prop.SUBSCRIPTION_IDENTIFIER: (VARINT, frozenset({PUBLISH, SUBSCRIBE})),
    Prop.SESSION_EXPIRY_INTERVAL: (FOUR, frozenset({CONNECT, CONNACK, DISCONNECT})),
    Prop.ASSIGNED_CLIENT_IDENTIFIER: (UTF8, frozenset({CONNACK})),
    Prop.SERVER_KEEP_ALIVE: (TWO, frozenset({CONNACK})),
    Prop.AUTHENTICATION_METHOD: (UTF8, frozenset({CONNECT, CONNACK, AUTH})),
    Prop.AUTHENTICATION_DATA: (BINARY, frozenset({CONNECT, CONNACK, AUTH})),
    Prop.REQUEST_PROBLEM_INFORMATION: (BYTE, frozenset({CONNECT})),
    Prop.WILL_DELAY_INTERVAL: (FOUR, frozenset({WILL})),
    Prop.REQUEST_RESPONSE_INFORMATION: (BYTE, frozenset({CONNECT})),
    Prop.RESPONSE_INFORMATION: (UTF8, frozenset({CONNACK})),
    Prop.SERVER_REFERENCE: (UTF8, frozenset({CONNACK, DISCONNECT})),
    Prop.REASON_STRING: (UTF8, frozenset({CONNACK, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK,
                                          UNSUBACK, DISCONNECT, AUTH})),
    Prop.RECEIVE_MAXIMUM: (TWO, frozenset({CONNECT, CONNACK})),
    Prop.TOPIC_ALIAS_MAXIMUM: (TWO, frozenset({CONNECT, CONNACK})),
    Prop.TOPIC_ALIAS: (TWO, frozenset({PUBLISH})),
    Prop.MAXIMUM_QOS: (BYTE, frozenset({CONNACK})),
    Prop.RETAIN_AVAILABLE: (BYTE, frozenset({CONNACK})),
    Prop.USER_PROPERTY: (PAIR, frozenset({CONNECT, CONNACK, PUBLISH, WILL, PUBACK, PUBREC, PUBREL,
                                          PUBCOMP, SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK,
                                          DISCONNECT, AUTH})),
    Prop.MAXIMUM_PACKET_SIZE: (FOUR, frozenset({CONNECT, CONNACK})),
    Prop.WILDCARD_SUBSCRIPTION_AVAILABLE: (BYTE, frozenset({CONNACK})),
    Prop.SUBSCRIPTION_IDENTIFIER_AVAILABLE: (BYTE, frozenset({CONNACK})),
    Prop.SHARED_SUBSCRIPTION_AVAILABLE: (BYTE, frozenset({CONNACK})),
}


class Will:
    __slots__ = ("topic", "payload", "qos", "retain", "props")

    def __init__(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                 props: Properties | None = None) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.props: Properties = props if props is not None else {}


class Packet:
    """Base of every control packet. ``type`` is the fixed-header packet type."""

    __slots__ = ()
    type: int = 0

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)  # type: ignore[attr-defined]

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._fields() == other._fields()  # type: ignore[attr-defined]

    def __hash__(self) -> int:  # packets are mutable; identity hash like a plain object
        return id(self)

    def __repr__(self) -> str:
        args = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)  # type: ignore[attr-defined]
        return f"{type(self).__name__}({args})"


def _will_fields(w: Will | None) -> tuple[Any, ...] | None:
    return None if w is None else (w.topic, w.payload, w.qos, w.retain, w.props)


class Connect(Packet):
    __slots__ = ("protocol_name", "protocol_level", "clean_start", "keepalive", "client_id",
                 "will", "username", "password", "props")
    type = CONNECT

    def __init__(self, client_id: str = "", protocol_level: int = MQTT_311, clean_start: bool = True,
                 keepalive: int = 60, will: Will | None = None, username: str | None = None,
                 password: bytes | None = None, props: Properties | None = None,
                 protocol_name: str | None = None) -> None:
        self.protocol_name = protocol_name or ("MQIsdp" if protocol_level == MQTT_31 else "MQTT")
        self.protocol_level = protocol_level
        self.clean_start = clean_start
        self.keepalive = keepalive
        self.client_id = client_id
        self.will = will
        self.username = username
        self.password = password
        self.props: Properties = props if props is not None else {}

    def _fields(self) -> tuple[Any, ...]:
        return (self.protocol_name, self.protocol_level, self.clean_start, self.keepalive,
                self.client_id, _will_fields(self.will), self.username, self.password, self.props)


class Connack(Packet):
    __slots__ = ("session_present", "reason_code", "props")
    type = CONNACK

    def __init__(self, session_present: bool = False, reason_code: int = 0,
                 props: Properties | None = None) -> None:
        self.session_present = session_present
        self.reason_code = reason_code
        self.props: Properties = props if props is not None else {}


class Publish(Packet):
    """An application message. ``packet_id`` is 0 for QoS 0.

    ``topic`` may be "" on the wire from a v5 client that uses a topic alias;
    the connection resolves it before the shard sees the packet.
    """

    __slots__ = ("topic", "payload", "qos", "retain", "dup", "packet_id", "props", "wire")
    type = PUBLISH

    def __init__(self, topic: str, payload: bytes = b"", qos: int = 0, retain: bool = False,
                 dup: bool = False, packet_id: int = 0, props: Properties | None = None) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.packet_id = packet_id
        self.props: Properties = props if props is not None else {}
        # The property block exactly as received (length + properties), set by the
        # decoder when there were properties: the broker forwards it as it is instead
        # of encoding ``props`` again. Not part of the packet's value (``_fields``).
        self.wire: bytes | None = None

    def _fields(self) -> tuple[Any, ...]:
        return (self.topic, self.payload, self.qos, self.retain, self.dup, self.packet_id,
                self.props)

    def __repr__(self) -> str:
        return (f"Publish(topic={self.topic!r}, payload={self.payload!r}, qos={self.qos}, "
                f"retain={self.retain}, dup={self.dup}, packet_id={self.packet_id}, "
                f"props={self.props!r})")


class _Ack(Packet):
    """PUBACK/PUBREC/PUBREL/PUBCOMP: a packet id, a reason code, properties."""

    __slots__ = ("packet_id", "reason_code", "props")

    def __init__(self, packet_id: int, reason_code: int = 0, props: Properties | None = None) -> None:
        self.packet_id = packet_id
        self.reason_code = reason_code
        self.props: Properties = props if props is not None else {}


class Puback(_Ack):
    __slots__ = ()
    type = PUBACK


class Pubrec(_Ack):
    __slots__ = ()
    type = PUBREC


class Pubrel(_Ack):
    __slots__ = ()
    type = PUBREL


class Pubcomp(_Ack):
    __slots__ = ()
    type = PUBCOMP


class SubOptions:
    """Per-filter subscription options (spec 3.8.3.1). v3 carries only ``qos``."""

    __slots__ = ("qos", "no_local", "retain_as_published", "retain_handling")

    def __init__(self, qos: int = 0, no_local: bool = False, retain_as_published: bool = False,
                 retain_handling: int = 0) -> None:
        self.qos = qos
        self.no_local = no_local
        self.retain_as_published = retain_as_published
        self.retain_handling = retain_handling

    def _t(self) -> tuple[int, bool, bool, int]:
        return (self.qos, self.no_local, self.retain_as_published, self.retain_handling)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SubOptions) and self._t() == other._t()

    def __hash__(self) -> int:
        return hash(self._t())

    def __repr__(self) -> str:
        return "SubOptions(qos=%d, no_local=%r, rap=%r, rh=%d)" % self._t()


class Subscribe(Packet):
    __slots__ = ("packet_id", "topics", "props")
    type = SUBSCRIBE

    def __init__(self, packet_id: int, topics: list[tuple[str, SubOptions]],
                 props: Properties | None = None) -> None:
        self.packet_id = packet_id
        self.topics = topics
        self.props: Properties = props if props is not None else {}


class Suback(Packet):
    __slots__ = ("packet_id", "reason_codes", "props")
    type = SUBACK

    def __init__(self, packet_id: int, reason_codes: list[int], props: Properties | None = None) -> None:
        self.packet_id = packet_id
        self.reason_codes = reason_codes
        self.props: Properties = props if props is not None else {}


class Unsubscribe(Packet):
    __slots__ = ("packet_id", "topics", "props")
    type = UNSUBSCRIBE

    def __init__(self, packet_id: int, topics: list[str], props: Properties | None = None) -> None:
        self.packet_id = packet_id
        self.topics = topics
        self.props: Properties = props if props is not None else {}


class Unsuback(Packet):
    """``reason_codes`` is empty for v3 (the v3 UNSUBACK carries none)."""

    __slots__ = ("packet_id", "reason_codes", "props")
    type = UNSUBACK

    def __init__(self, packet_id: int, reason_codes: list[int] | None = None,
                 props: Properties | None = None) -> None:
        self.packet_id = packet_id
        self.reason_codes = reason_codes if reason_codes is not None else []
        self.props: Properties = props if props is not None else {}


class Pingreq(Packet):
    __slots__ = ()
    type = PINGREQ


class Pingresp(Packet):
    __slots__ = ()
    type = PINGRESP


class Disconnect(Packet):
    __slots__ = ("reason_code", "props")
    type = DISCONNECT

    def __init__(self, reason_code: int = 0, props: Properties | None = None) -> None:
        self.reason_code = reason_code
        self.props: Properties = props if props is not None else {}


class Auth(Packet):
    __slots__ = ("reason_code", "props")
    type = AUTH

    def __init__(self, reason_code: int = 0, props: Properties | None = None) -> None:
        self.reason_code = reason_code
        self.props: Properties = props if props is not None else {}
