"""Properties carried as an encoded block: spliced per delivery, across the bus undecoded."""

from __future__ import annotations

import pytest

from shards.message import Message
from shards.protocol.codec import (
    decode, decode_properties, encode, encode_properties, encode_publish, expiry_entry,
    splice_properties, subscription_ids_entries, topic_alias_entry,
)
from shards.protocol.connection import MQTTConnection
from shards.protocol.packets import MQTT_5, MQTT_311, Connack, Connect, Prop, Puback, Publish
from shards.protocol.reader import FrameReader
from shards.transfer import message_from_frame, message_to_bytes

PROPS = {Prop.USER_PROPERTY: [("b", "2"), ("a", "1")], Prop.CONTENT_TYPE: "text/plain",
         Prop.CORRELATION_DATA: b"\x00\x01"}


@pytest.mark.parametrize("block", [None, encode_properties(PROPS)])
def test_splice_adds_hop_properties_and_keeps_the_rest(block: bytes | None) -> None:
    entries = subscription_ids_entries((7, 300)) + expiry_entry(42) + topic_alias_entry(3)
    got = decode_properties(splice_properties(block, entries))
    want = dict(PROPS) if block else {}
    want.update({Prop.SUBSCRIPTION_IDENTIFIER: [7, 300], Prop.MESSAGE_EXPIRY_INTERVAL: 42,
                 Prop.TOPIC_ALIAS: 3})
    assert got == want
    if block:  # user properties keep their order [MQTT-3.3.2-18]
        assert got[Prop.USER_PROPERTY] == [("b", "2"), ("a", "1")]


def test_splice_grows_a_multi_byte_property_length() -> None:
    block = encode_properties({Prop.CONTENT_TYPE: "x" * 125})  # length 128: two bytes
    spliced = splice_properties(block, expiry_entry(1))
    assert decode_properties(spliced) == {Prop.CONTENT_TYPE: "x" * 125,
                                          Prop.MESSAGE_EXPIRY_INTERVAL: 1}


def test_encode_publish_takes_a_block_or_a_dict_alike() -> None:
    a = encode(Publish("t", b"p", 1, packet_id=5, props=PROPS), MQTT_5)
    assert encode_publish("t", b"p", 1, False, False, 5, encode_properties(PROPS), MQTT_5) == a


def test_decoded_publish_keeps_its_block_and_message_reuses_it() -> None:
    data = encode(Publish("t", b"p", props=PROPS), MQTT_5)
    p = decode(data[0], data[2:], MQTT_5)
    assert isinstance(p, Publish) and p.wire == encode_properties(PROPS)
    msg = Message.from_publish(p.topic, p.payload, 0, False, p.props, "c", 0.0, 1, p.wire)
    assert msg.props_block() is p.wire


def test_hop_properties_are_not_forwarded_in_the_block() -> None:
    props = dict(PROPS)
    props[Prop.MESSAGE_EXPIRY_INTERVAL] = 60
    data = encode(Publish("t", b"p", props=props), MQTT_5)
    p = decode(data[0], data[2:], MQTT_5)
    msg = Message.from_publish(p.topic, p.payload, 0, False, p.props, "c", 100.0, 1, p.wire)
    assert msg.expires_at == 160.0
    assert decode_properties(msg.props_block()) == PROPS  # type: ignore[arg-type]


def test_bus_frame_carries_the_block_undecoded() -> None:
    wire = encode_properties(PROPS)
    msg = Message("a/b", b"pay", 1, True, None, 99.5, "origin", 0.0, 12, wire)
    back, flags, group = message_from_frame(message_to_bytes(msg), 5.0)
    assert (back.topic, back.payload, back.qos, back.retain, back.expires_at, back.origin,
            back.id, flags, group) == ("a/b", b"pay", 1, True, 99.5, "origin", 12, 0, "")
    assert back.wire == wire
    assert back.props == PROPS  # decoded on demand


def test_message_without_properties_has_no_block() -> None:
    msg = Message("a", b"", 0, False, {}, None, "o", 0.0)
    assert msg.props_block() is None and msg.props is None
    back = message_from_frame(message_to_bytes(msg), 0.0)[0]
    assert back.wire is None and back.props is None


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
@pytest.mark.parametrize("pid", [1, 255, 256, 65535])
def test_send_puback_writes_what_encode_makes(version: int, pid: int) -> None:
    conn = MQTTConnection(0.0)
    conn.receive_data(encode(Connect("c", protocol_level=version), version), 0.0)
    assert isinstance(conn.next_packet(), Connect)
    conn.accept(Connack(), 10)
    conn.data_to_send()
    conn.send_puback(pid)
    assert conn.data_to_send() == encode(Puback(pid), version)


def test_reader_joins_a_frame_spread_over_many_chunks() -> None:
    data = encode(Publish("t", bytes(range(256)) * 40), MQTT_311)
    reader = FrameReader()
    for i in range(0, len(data), 7):
        reader.feed(data[i:i + 7])
    reader.feed(data[:5])  # the start of the next frame stays buffered
    first, body = reader.next_frame()  # type: ignore[misc]
    assert first == data[0] and bytes(body) == data[-len(body):]
    assert reader.next_frame() is None and reader.buffered() == 5
