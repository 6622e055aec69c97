"""Known bytes for every packet type at every protocol level, both directions.

Client-side malformed input lives in tests/corpus/malformed.json; this file
covers the encodings themselves, version downgrades, and the decoder's checks
on packets only a server sends.
"""

from __future__ import annotations

import pytest

from shards.protocol.codec import (
    connect_protocol_level, decode, encode, encode_publish, encode_remaining_length,
)
from shards.protocol.errors import ProtocolError, Reason
from shards.protocol.packets import (
    Auth, Connack, Connect, Disconnect, Packet, Pingreq, Pingresp, Prop, Puback, Pubcomp, Publish,
    Pubrec, Pubrel, Suback, Subscribe, SubOptions, Unsuback, Unsubscribe, Will,
)
from shards.protocol.reader import FrameReader


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def split(data: bytes) -> tuple[int, bytes | memoryview]:
    r = FrameReader()
    r.feed(data)
    f = r.next_frame()
    assert f is not None and r.buffered() == 0
    return f


def dec(data: bytes, version: int) -> Packet:
    b0, body = split(data)
    return decode(b0, body, version)


def reason_of(data: bytes, version: int) -> int:
    with pytest.raises(ProtocolError) as e:
        dec(data, version)
    return e.value.reason


MQTT = "0004 4d515454"
MQISDP = "0006 4d5149736470"

# (packet, version, wire bytes): encode(packet) == bytes and decode(bytes) == packet.
EXACT: list[tuple[Packet, int, str]] = [
    # CONNECT
    (Connect("abc", 4, True, 60), 4, f"10 0f {MQTT} 04 02 003c 0003 616263"),
    (Connect("abc", 3, True, 60), 3, f"10 11 {MQISDP} 03 02 003c 0003 616263"),
    (Connect("abc", 5, True, 60), 5, f"10 10 {MQTT} 05 02 003c 00 0003 616263"),
    (Connect("", 4, False, 0), 4, f"10 0c {MQTT} 04 00 0000 0000"),
    # spec 3.1.2.12 example header: clean start, user name, password, session expiry 10
    (Connect("c", 5, True, 10, username="u", password=b"p", props={Prop.SESSION_EXPIRY_INTERVAL: 10}),
     5, f"10 19 {MQTT} 05 c2 000a 05 110000000a 0001 63 0001 75 0001 70"),
    (Connect("c", 4, True, 60, will=Will("w/t", b"hi", 1, True)), 4,
     f"10 16 {MQTT} 04 2e 003c 0001 63 0003 772f74 0002 6869"),
    (Connect("c", 5, False, 60, will=Will("w/t", b"", 2, False, {Prop.WILL_DELAY_INTERVAL: 5}),
             username="user", props={Prop.RECEIVE_MAXIMUM: 10}), 5,
     f"10 24 {MQTT} 05 94 003c 03 21000a 0001 63 05 1800000005 0003 772f74 0000 0004 75736572"),
    # v5 allows a password without a user name
    (Connect("c", 5, True, 60, password=b"\x00\xff"), 5, f"10 12 {MQTT} 05 42 003c 00 0001 63 0002 00ff"),
    # CONNACK
    (Connack(True, 0), 4, "20 02 01 00"),
    (Connack(False, Reason.NOT_AUTHORIZED), 4, "20 02 00 05"),
    (Connack(False, Reason.UNSUPPORTED_PROTOCOL_VERSION), 3, "20 02 00 01"),
    (Connack(False, 0), 5, "20 03 00 00 00"),
    (Connack(True, 0, {Prop.RECEIVE_MAXIMUM: 20, Prop.TOPIC_ALIAS_MAXIMUM: 10}), 5,
     "20 09 01 00 06 210014 22000a"),
    (Connack(False, Reason.BANNED, {Prop.REASON_STRING: "no"}), 5, "20 08 00 8a 05 1f 0002 6e6f"),
    # PUBLISH
    (Publish("a/b", b"hello"), 4, "30 0a 0003 612f62 68656c6c6f"),
    (Publish("a/b", b"hello", 1, True, True, 7), 4, "3b 0c 0003 612f62 0007 68656c6c6f"),
    (Publish("a/b", b"hello", 2, False, False, 0xFFFF), 3, "34 0c 0003 612f62 ffff 68656c6c6f"),
    (Publish("a/b", b""), 5, "30 06 0003 612f62 00"),
    (Publish("a/b", b"x", 1, False, False, 1,
             {Prop.PAYLOAD_FORMAT_INDICATOR: 1, Prop.USER_PROPERTY: [("k", "v"), ("k", "w")],
              Prop.SUBSCRIPTION_IDENTIFIER: [1, 300]}), 5,
     "32 1e 0003 612f62 0001 15 0101 0b01 0bac02 26 0001 6b 0001 76 26 0001 6b 0001 77 78"),
    (Publish("", b"x", 0, False, False, 0, {Prop.TOPIC_ALIAS: 3}), 5, "30 07 0000 03 230003 78"),
    (Publish("ü", b"", 0), 4, "30 04 0002 c3bc"),
    # acks
    (Puback(7), 4, "40 02 0007"),
    (Puback(7), 5, "40 02 0007"),
    (Puback(7, 0x10), 5, "40 03 0007 10"),
    (Puback(7, 0x10, {Prop.REASON_STRING: "x"}), 5, "40 08 0007 10 04 1f 0001 78"),
    (Puback(7, 0, {Prop.USER_PROPERTY: [("a", "b")]}), 5, "40 0b 0007 00 07 26 0001 61 0001 62"),
    (Pubrec(1), 4, "50 02 0001"),
    (Pubrec(1, 0x80), 5, "50 03 0001 80"),
    (Pubrel(1), 4, "62 02 0001"),
    (Pubrel(1), 3, "62 02 0001"),
    (Pubrel(1, 0x92), 5, "62 03 0001 92"),
    (Pubcomp(1), 4, "70 02 0001"),
    (Pubcomp(1, 0x92), 5, "70 03 0001 92"),
    # SUBSCRIBE / SUBACK
    (Subscribe(1, [("a/b", SubOptions(1)), ("c/#", SubOptions(2))]), 4,
     "82 0e 0001 0003 612f62 01 0003 632f23 02"),
    (Subscribe(1, [("a", SubOptions(0))]), 3, "82 06 0001 0001 61 00"),
    (Subscribe(1, [("a/b", SubOptions(1, True, True, 2))], {Prop.SUBSCRIPTION_IDENTIFIER: 5}), 5,
     "82 0b 0001 02 0b05 0003 612f62 2d"),
    (Subscribe(2, [("x", SubOptions(0, False, False, 1))]), 5, "82 07 0002 00 0001 78 10"),
    (Suback(1, [0, 1, 0x80]), 4, "90 05 0001 00 01 80"),
    (Suback(1, [0, 0x87, 2, 0xA2]), 5, "90 07 0001 00 00 87 02 a2"),
    # UNSUBSCRIBE / UNSUBACK
    (Unsubscribe(1, ["a/b"]), 4, "a2 07 0001 0003 612f62"),
    (Unsubscribe(1, ["a/b", "#"]), 5, "a2 0b 0001 00 0003 612f62 0001 23"),
    (Unsuback(1), 4, "b0 02 0001"),
    (Unsuback(1, [0, 0x11]), 5, "b0 05 0001 00 00 11"),
    # PING / DISCONNECT / AUTH
    (Pingreq(), 4, "c0 00"),
    (Pingreq(), 5, "c0 00"),
    (Pingresp(), 3, "d0 00"),
    (Pingresp(), 4, "d0 00"),
    (Pingresp(), 5, "d0 00"),
    (Disconnect(), 4, "e0 00"),
    (Disconnect(), 5, "e0 00"),
    (Disconnect(Reason.DISCONNECT_WITH_WILL), 5, "e0 01 04"),
    (Disconnect(0, {Prop.SESSION_EXPIRY_INTERVAL: 60}), 5, "e0 07 00 05 110000003c"),
    (Disconnect(Reason.SESSION_TAKEN_OVER, {Prop.SERVER_REFERENCE: "h"}), 5, "e0 06 8e 04 1c 0001 68"),
    (Auth(), 5, "f0 00"),
    (Auth(0x18), 5, "f0 01 18"),
    (Auth(0x18, {Prop.AUTHENTICATION_METHOD: "SCRAM"}), 5, "f0 0a 18 08 15 0005 5343 52 41 4d"),
]


@pytest.mark.parametrize("packet, version, wire", EXACT,
                         ids=[f"{type(p).__name__}-v{v}-{i}" for i, (p, v, _) in enumerate(EXACT)])
def test_exact_bytes(packet: Packet, version: int, wire: str) -> None:
    data = h(wire)
    assert encode(packet, version) == data
    dec_version = 0 if isinstance(packet, Connect) else version
    assert dec(data, dec_version) == packet


def test_every_packet_type_and_version_is_covered() -> None:
    seen = {(type(p).__name__, v) for p, v, _ in EXACT}
    for cls in ("Connect", "Connack", "Publish", "Puback", "Pubrec", "Pubrel", "Pubcomp", "Subscribe",
                "Suback", "Unsubscribe", "Unsuback", "Pingreq", "Pingresp", "Disconnect"):
        assert (cls, 4) in seen and (cls, 5) in seen, cls
    assert ("Auth", 5) in seen
    assert {name for name, v in seen if v == 3} >= {"Connect", "Connack", "Publish", "Pubrel",
                                                     "Subscribe", "Pingresp"}


# ---------------------------------------------------------------------------
# Downgrades: what an older peer cannot carry is dropped.
# ---------------------------------------------------------------------------

DOWNGRADES: list[tuple[Packet, int, str]] = [
    (Connack(True, 0, {Prop.RECEIVE_MAXIMUM: 5}), 4, "20 02 01 00"),
    (Connack(True, 0), 3, "20 02 00 00"),  # 3.1 has no session-present flag
    (Connack(True, Reason.BANNED), 5, "20 03 00 8a 00"),  # refused: session present forced to 0
    (Connack(False, Reason.BAD_USER_NAME_OR_PASSWORD), 4, "20 02 00 04"),
    (Connack(False, Reason.CLIENT_IDENTIFIER_NOT_VALID), 4, "20 02 00 02"),
    (Connack(False, Reason.SERVER_BUSY), 4, "20 02 00 03"),
    (Connack(False, Reason.NOT_AUTHORIZED), 3, "20 02 00 05"),
    (Publish("a", b"x", 1, False, False, 2, {Prop.MESSAGE_EXPIRY_INTERVAL: 9}), 4, "32 06 0001 61 0002 78"),
    (Puback(3, 0x10, {Prop.REASON_STRING: "r"}), 4, "40 02 0003"),
    (Pubrec(3, 0x80), 3, "50 02 0003"),
    (Pubrel(3, 0x92), 4, "62 02 0003"),
    (Pubcomp(3, 0x92), 4, "70 02 0003"),
    (Subscribe(1, [("a", SubOptions(1, True, True, 2))], {Prop.SUBSCRIPTION_IDENTIFIER: 4}), 4,
     "82 06 0001 0001 61 01"),
    (Suback(1, [0, 1, 2, 0x80, 0x87, 0x8F, 0x97, 0xA2]), 4, "90 0a 0001 00 01 02 80 80 80 80 80"),
    (Suback(1, [0x91], {Prop.REASON_STRING: "x"}), 3, "90 03 0001 80"),
    (Unsubscribe(1, ["a"], {Prop.USER_PROPERTY: [("k", "v")]}), 4, "a2 05 0001 0001 61"),
    (Unsuback(1, [0, 0x11, 0x87]), 4, "b0 02 0001"),
    (Unsuback(1, [0]), 3, "b0 02 0001"),
    (Disconnect(Reason.SERVER_SHUTTING_DOWN, {Prop.REASON_STRING: "bye"}), 4, "e0 00"),
    (Connect("c", 4, True, 60, will=Will("t", b"", 0, False, {Prop.WILL_DELAY_INTERVAL: 1}),
             props={Prop.SESSION_EXPIRY_INTERVAL: 1}), 4, f"10 12 {MQTT} 04 06 003c 0001 63 0001 74 0000"),
]


@pytest.mark.parametrize("packet, version, wire", DOWNGRADES,
                         ids=[f"{type(p).__name__}-v{v}-{i}" for i, (p, v, _) in enumerate(DOWNGRADES)])
def test_downgrade(packet: Packet, version: int, wire: str) -> None:
    assert encode(packet, version) == h(wire)


def test_v3_connack_decodes_to_v5_reason() -> None:
    assert dec(h("20 02 00 02"), 4) == Connack(False, Reason.CLIENT_IDENTIFIER_NOT_VALID)
    assert dec(h("20 02 00 03"), 4) == Connack(False, Reason.SERVER_UNAVAILABLE)
    assert dec(h("20 02 01 00"), 3) == Connack(False, 0)  # 3.1: the byte is reserved, ignored


def test_v3_unsuback_has_no_codes() -> None:
    assert dec(h("b0 02 0001"), 4) == Unsuback(1, [])


def test_auth_does_not_exist_before_v5() -> None:
    with pytest.raises(ValueError):
        encode(Auth(), 4)


def test_property_order_is_canonical() -> None:
    a = {Prop.USER_PROPERTY: [("x", "1")], Prop.CONTENT_TYPE: "t", Prop.MESSAGE_EXPIRY_INTERVAL: 5}
    b = {Prop.MESSAGE_EXPIRY_INTERVAL: 5, Prop.CONTENT_TYPE: "t", Prop.USER_PROPERTY: [("x", "1")]}
    assert encode(Publish("a", b"", props=a), 5) == encode(Publish("a", b"", props=b), 5)


# ---------------------------------------------------------------------------
# encode_publish: the hot path must agree with encode(Publish)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [3, 4, 5])
@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("size", [0, 1, 100, 121, 122, 123, 124, 125, 126, 127, 128, 16000, 16380,
                                  16384, 70000])
def test_encode_publish_lengths(version: int, qos: int, size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    props = {Prop.CONTENT_TYPE: "c"} if version == 5 and size % 2 else None
    pid = 9 if qos else 0
    data = encode_publish("t/x", payload, qos, True, qos > 0, pid, props, version)
    p = dec(data, version)
    assert p == Publish("t/x", payload, qos, True, qos > 0, pid, props or {})
    assert isinstance(p, Publish) and type(p.payload) is bytes
    assert data == encode(p, version)


def test_encode_publish_ignores_packet_id_for_qos0() -> None:
    assert encode_publish("a", b"", 0, False, False, 5, None, 4) == h("30 03 0001 61")


@pytest.mark.parametrize("n, wire", [(0, "00"), (127, "7f"), (128, "8001"), (16383, "ff7f"),
                                     (16384, "808001"), (2097151, "ffff7f"), (2097152, "80808001"),
                                     (268435455, "ffffff7f")])
def test_remaining_length(n: int, wire: str) -> None:
    assert encode_remaining_length(n) == h(wire)


@pytest.mark.parametrize("n", [-1, 268435456])
def test_remaining_length_out_of_range(n: int) -> None:
    with pytest.raises(ValueError):
        encode_remaining_length(n)


# ---------------------------------------------------------------------------
# Decoder checks not in the client corpus: server-side packets, reason codes,
# value ranges that the spec leaves to the receiver.
# ---------------------------------------------------------------------------

M, P = Reason.MALFORMED_PACKET, Reason.PROTOCOL_ERROR

REJECTED: list[tuple[str, int, str, int]] = [
    ("connack_reserved_flags_v5", 5, "20 03 02 00 00", M),
    ("connack_reserved_flags_v311", 4, "20 02 02 00", M),
    ("connack_unknown_return_code_v311", 4, "20 02 00 06", M),
    ("connack_too_long_v311", 4, "20 03 00 00 00", M),
    ("connack_missing_property_length_v5", 5, "20 02 00 00", M),
    ("connack_bad_reason_code_v5", 5, "20 03 00 10 00", M),
    ("connack_maximum_qos_2", 5, "20 05 00 00 02 2402", P),
    ("connack_retain_available_2", 5, "20 05 00 00 02 2502", P),
    ("connack_wildcard_available_2", 5, "20 05 00 00 02 2802", P),
    ("connack_subid_available_2", 5, "20 05 00 00 02 2902", P),
    ("connack_shared_available_2", 5, "20 05 00 00 02 2a02", P),
    ("connack_property_not_allowed", 5, "20 05 00 00 02 0101", M),
    ("connack_trailing", 5, "20 04 00 00 00 00", M),
    ("connack_flags", 5, "21 03 00 00 00", M),
    ("suback_no_codes_v311", 4, "90 02 0001", P),
    ("suback_bad_code_v311", 4, "90 03 0001 03", M),
    ("suback_bad_code_v5", 5, "90 04 0001 00 10", M),
    ("suback_packet_id_zero", 4, "90 03 0000 00", P),
    ("suback_flags", 4, "92 03 0001 00", M),
    ("unsuback_trailing_v311", 4, "b0 03 0001 00", M),
    ("unsuback_no_codes_v5", 5, "b0 03 0001 00", P),
    ("unsuback_bad_code_v5", 5, "b0 04 0001 00 01", M),
    ("pingresp_with_body", 4, "d0 01 00", M),
    ("pingresp_flags", 4, "d8 00", M),
    ("puback_bad_reason_code", 5, "40 03 0001 05", M),
    ("pubrel_bad_reason_code", 5, "62 03 0001 10", M),
    ("pubcomp_bad_reason_code", 5, "70 03 0001 80", M),
    ("puback_trailing_after_props", 5, "40 05 0001 00 00 00", M),
    ("disconnect_bad_reason_code", 5, "e0 01 01", M),
    ("disconnect_trailing_after_props", 5, "e0 03 00 00 00", M),
    ("auth_bad_reason_code", 5, "f0 01 01", M),
    ("auth_trailing", 5, "f0 03 18 00 00", M),
    ("auth_v3", 3, "f0 00", M),
    ("publish_payload_format_2", 5, "30 07 0001 61 02 0102 78", P),
    ("publish_property_id_multibyte", 5, "30 07 0001 61 02 8101 78", M),
    ("publish_binary_property_truncated", 5, "30 09 0001 61 04 09 0005 61 78", M),
    ("publish_four_byte_property_truncated", 5, "30 08 0001 61 03 02 0000 78", M),
    ("publish_two_byte_property_truncated", 5, "30 06 0001 61 02 23 00", M),
    ("publish_byte_property_truncated", 5, "30 05 0001 61 01 01", M),
    ("publish_varint_property_truncated", 5, "30 06 0001 61 02 0b 80", M),
    ("publish_varint_property_5_bytes", 5, "30 0b 0001 61 06 0b 8080808001 78", M),
    ("publish_user_property_missing_value", 5, "30 09 0001 61 05 26 0001 6b 00", M),
    ("first_packet_not_connect_publish", 0, "30 04 0001 61 78", P),
    ("first_packet_not_connect_pingreq", 0, "c0 00", P),
    ("connect_empty_body", 0, "10 00", M),
    ("connect_truncated_protocol_name", 0, "10 04 0004 4d51", M),
    ("connect_v5_will_props_truncated", 0, f"10 10 {MQTT} 05 06 003c 00 0001 63 05 18", M),
]


@pytest.mark.parametrize("name, version, wire, reason", REJECTED, ids=[r[0] for r in REJECTED])
def test_rejected(name: str, version: int, wire: str, reason: int) -> None:
    assert reason_of(h(wire), version) == reason


def test_connect_decodes_at_any_version() -> None:
    # A second CONNECT is the connection's business [MQTT-3.1.0-2]; the decoder reads it.
    data = encode(Connect("x", 5), 5)
    for v in (0, 3, 4, 5):
        assert dec(data, v) == Connect("x", 5)


def test_empty_client_id_is_decoded() -> None:
    # Whether an empty id is acceptable (v5 assigns one, 3.1.1 needs clean session) is the broker's call.
    assert dec(encode(Connect("", 4, False), 4), 0) == Connect("", 4, False)


def test_publish_topic_alias_with_topic() -> None:
    p = Publish("a/b", b"x", props={Prop.TOPIC_ALIAS: 1})
    assert dec(encode(p, 5), 5) == p


def test_publish_payload_is_bytes_for_memoryview_body() -> None:
    data = encode(Publish("a", b"p" * 5000), 4)
    b0, body = split(data)
    assert isinstance(body, memoryview)
    p = decode(b0, body, 4)
    assert isinstance(p, Publish) and type(p.payload) is bytes and p.payload == b"p" * 5000


def test_decode_accepts_bytearray_and_memoryview_bodies() -> None:
    data = encode(Subscribe(3, [("a/+", SubOptions(1))], {Prop.USER_PROPERTY: [("k", "v")]}), 5)
    b0, body = split(data)
    expected = Subscribe(3, [("a/+", SubOptions(1))], {Prop.USER_PROPERTY: [("k", "v")]})
    for variant in (bytes(body), bytearray(body), memoryview(bytes(body))):
        assert decode(b0, variant, 5) == expected  # type: ignore[arg-type]  # bytearray works too


def test_subscription_identifier_shapes() -> None:
    sub = Subscribe(1, [("a", SubOptions())], {Prop.SUBSCRIPTION_IDENTIFIER: 268435455})
    assert dec(encode(sub, 5), 5) == sub
    pub = Publish("a", b"", props={Prop.SUBSCRIPTION_IDENTIFIER: [3, 3, 268435455]})
    assert dec(encode(pub, 5), 5) == pub


def test_subscribe_filter_semantics_are_not_the_decoders_business() -> None:
    # Invalid filters are refused per filter in SUBACK (0x8F) by the broker.
    sub = Subscribe(1, [("a/#/b", SubOptions()), ("$share//x", SubOptions()), ("+a", SubOptions())])
    assert dec(encode(sub, 4), 4) == sub
    assert dec(encode(sub, 5), 5) == sub


def test_decode_never_raises_anything_but_protocol_error_on_garbage() -> None:
    for b0 in range(256):
        for body in (b"", b"\x00", b"\xff" * 3, b"\x00\x01a\x00\x01\x00", b"\x00\x04MQTT\x05\xff\xff\xff"):
            for v in (0, 3, 4, 5):
                try:
                    decode(b0, body, v)
                except ProtocolError:
                    pass


@pytest.mark.parametrize("wire, level", [
    (f"{MQTT} 04 03 003c 0001 63", 4),  # reserved flag set: decode fails, the level is still 4
    (f"{MQISDP} 03 02", 3),
    (f"{MQTT} 06", 6),
    (f"{MQTT}", 0),
    ("00", 0),
    ("", 0),
])
def test_connect_protocol_level(wire: str, level: int) -> None:
    assert connect_protocol_level(h(wire)) == level
