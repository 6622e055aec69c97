"""The one error type for "the peer misbehaved", and the MQTT reason codes.

Every protocol violation anywhere in the sans-IO core raises :class:`ProtocolError`
carrying the MQTT 5 reason code that describes it. The connection layer maps it
to a CONNACK (before the session is established) or a DISCONNECT (after), in one
place, and then closes: after a protocol error nothing more is read.
"""

from __future__ import annotations

from enum import IntEnum


class Reason(IntEnum):
    """MQTT 5.0 reason codes (spec 2.4). Names follow the specification."""

    SUCCESS = 0x00  # also NORMAL_DISCONNECTION and GRANTED_QOS_0
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    RE_AUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2


# MQTT 3.1/3.1.1 CONNACK return codes (spec 3.1.1, 3.2.2.3). A v5 reason code that
# refuses a connection maps onto the closest v3 code; anything else becomes
# "server unavailable", which is what a v3 client can act on.
V3_CONNACK_ACCEPTED = 0
V3_CONNACK_UNACCEPTABLE_PROTOCOL = 1
V3_CONNACK_IDENTIFIER_REJECTED = 2
V3_CONNACK_SERVER_UNAVAILABLE = 3
V3_CONNACK_BAD_USERNAME_OR_PASSWORD = 4
V3_CONNACK_NOT_AUTHORIZED = 5

_V5_TO_V3_CONNACK = {
    Reason.SUCCESS: V3_CONNACK_ACCEPTED,
    Reason.UNSUPPORTED_PROTOCOL_VERSION: V3_CONNACK_UNACCEPTABLE_PROTOCOL,
    Reason.CLIENT_IDENTIFIER_NOT_VALID: V3_CONNACK_IDENTIFIER_REJECTED,
    Reason.BAD_USER_NAME_OR_PASSWORD: V3_CONNACK_BAD_USERNAME_OR_PASSWORD,
    Reason.NOT_AUTHORIZED: V3_CONNACK_NOT_AUTHORIZED,
    Reason.BANNED: V3_CONNACK_NOT_AUTHORIZED,
    Reason.BAD_AUTHENTICATION_METHOD: V3_CONNACK_BAD_USERNAME_OR_PASSWORD,
}


def v3_connack_code(reason: int) -> int:
    """The MQTT 3.1.1 CONNACK return code closest to a v5 reason code."""
    return _V5_TO_V3_CONNACK.get(reason, V3_CONNACK_SERVER_UNAVAILABLE)  # type: ignore[call-overload]


class ProtocolError(Exception):
    """The peer sent something the protocol forbids.

    ``reason`` is the MQTT 5 reason code to report (CONNACK before the session
    exists, DISCONNECT after). ``message`` is for the log and, when the client
    asked for problem information, the Reason String.
    """

    __slots__ = ("reason", "message")

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = int(reason)
        self.message = message

    def __repr__(self) -> str:
        return f"ProtocolError(0x{self.reason:02X}, {self.message!r})"


def malformed(message: str) -> ProtocolError:
    return ProtocolError(Reason.MALFORMED_PACKET, message)


def protocol_error(message: str) -> ProtocolError:
    return ProtocolError(Reason.PROTOCOL_ERROR, message)
