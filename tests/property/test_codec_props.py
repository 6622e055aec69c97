"""Hypothesis: codec round trips for every packet type and version, and the
reader+decoder never raising anything but ProtocolError on hostile bytes."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shards.protocol import codec
from shards.protocol.codec import decode, encode, encode_publish
from shards.protocol.errors import ProtocolError
from shards.protocol.packets import (
    AUTH, BINARY, BYTE, CONNACK, CONNECT, DISCONNECT, FOUR, PAIR, PROPERTY_TABLE, PUBLISH, SUBACK,
    SUBSCRIBE, TWO, UNSUBACK, UNSUBSCRIBE, UTF8, VARINT, WILL, Auth, Connack, Connect, Disconnect,
    Packet, Pingreq, Pingresp, Prop, Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback, Subscribe,
    SubOptions, Unsuback, Unsubscribe, Will,
)
from shards.protocol.reader import FrameReader

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VERSIONS = st.sampled_from([3, 4, 5])

# Well-formed UTF-8 strings: no surrogates (unencodable), no U+0000 [MQTT-1.5.4-2].
text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12)
topic_name = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00+#"),
                     min_size=1, max_size=12)
# The decoder does not judge filter semantics (the broker answers 0x8F per filter), only
# that a filter is a non-empty string.
topic_filter = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1,
            max_size=12),
    st.sampled_from(["#", "+", "a/+/b", "a/#", "$share/g/a", "$queue/x", "$SYS/#"]),
)
binary = st.binary(max_size=16)
packet_id = st.integers(1, 0xFFFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
sub_id = st.integers(1, 268_435_455)

_NONZERO = {Prop.RECEIVE_MAXIMUM, Prop.TOPIC_ALIAS, Prop.MAXIMUM_PACKET_SIZE}


def _value(pid: int, kind: str, ptype: int) -> st.SearchStrategy[Any]:
    if kind is BYTE:
        return st.integers(0, 1)  # every one-byte property is a 0/1 flag
    if kind is TWO:
        return st.integers(1 if pid in _NONZERO else 0, 0xFFFF)
    if kind is FOUR:
        return st.integers(1 if pid in _NONZERO else 0, 0xFFFFFFFF)
    if kind is VARINT:
        return st.lists(sub_id, min_size=1, max_size=3) if ptype == PUBLISH else sub_id
    if kind is UTF8:
        return text
    if kind is BINARY:
        return binary
    assert kind is PAIR
    return st.lists(st.tuples(text, text), min_size=1, max_size=3)


def props_for(ptype: int) -> st.SearchStrategy[dict[int, Any]]:
    optional = {pid: _value(pid, kind, ptype)
                for pid, (kind, allowed) in PROPERTY_TABLE.items() if ptype in allowed}
    s = st.fixed_dictionaries({}, optional=optional)
    if ptype == CONNECT:
        s = s.filter(lambda p: Prop.AUTHENTICATION_DATA not in p or Prop.AUTHENTICATION_METHOD in p)
    return s


def props_if(version: int, ptype: int) -> st.SearchStrategy[dict[int, Any]]:
    return props_for(ptype) if version == 5 else st.just({})


@st.composite
def connects(draw: st.DrawFn, version: int) -> Connect:
    will = None
    if draw(st.booleans()):
        will = Will(draw(topic_name), draw(binary), draw(st.integers(0, 2)), draw(st.booleans()),
                    draw(props_if(version, WILL)))
    username = draw(st.none() | text)
    password = draw(st.none() | binary)
    if version != 5 and username is None:
        password = None  # [MQTT-3.1.2-22]
    return Connect(draw(text), version, draw(st.booleans()), draw(u16), will, username, password,
                   draw(props_if(version, CONNECT)))


@st.composite
def connacks(draw: st.DrawFn, version: int) -> Connack:
    if version == 5:
        rc = draw(st.sampled_from(sorted(codec._CONNACK_CODES)))
    else:
        rc = draw(st.sampled_from([0, 0x84, 0x85, 0x88, 0x86, 0x87]))
    sp = draw(st.booleans()) and rc == 0 and version != 3
    return Connack(sp, rc, draw(props_if(version, CONNACK)))


@st.composite
def publishes(draw: st.DrawFn, version: int) -> Publish:
    qos = draw(st.integers(0, 2))
    props = draw(props_if(version, PUBLISH))
    topic = draw(topic_name)
    if version == 5 and Prop.TOPIC_ALIAS in props and draw(st.booleans()):
        topic = ""  # the alias stands for the topic
    return Publish(topic, draw(st.binary(max_size=300)), qos, draw(st.booleans()),
                   qos > 0 and draw(st.booleans()), draw(packet_id) if qos else 0, props)


@st.composite
def acks(draw: st.DrawFn, version: int) -> Packet:
    cls = draw(st.sampled_from([Puback, Pubrec, Pubrel, Pubcomp]))
    if version != 5:
        return cls(draw(packet_id))
    rc = draw(st.sampled_from(sorted(codec._ACK_CODES[cls.type])))
    return cls(draw(packet_id), rc, draw(props_for(cls.type)))


@st.composite
def sub_options(draw: st.DrawFn, version: int, filt: str) -> SubOptions:
    qos = draw(st.integers(0, 2))
    if version != 5:
        return SubOptions(qos)
    no_local = draw(st.booleans()) and not filt.startswith("$share/")  # [MQTT-3.8.3-4]
    return SubOptions(qos, no_local, draw(st.booleans()), draw(st.integers(0, 2)))


@st.composite
def subscribes(draw: st.DrawFn, version: int) -> Subscribe:
    filters = draw(st.lists(topic_filter, min_size=1, max_size=4))
    topics = [(f, draw(sub_options(version, f))) for f in filters]
    return Subscribe(draw(packet_id), topics, draw(props_if(version, SUBSCRIBE)))


@st.composite
def subacks(draw: st.DrawFn, version: int) -> Suback:
    allowed = sorted(codec._SUBACK_CODES) if version == 5 else [0, 1, 2, 0x80]
    codes = draw(st.lists(st.sampled_from(allowed), min_size=1, max_size=5))
    return Suback(draw(packet_id), codes, draw(props_if(version, SUBACK)))


@st.composite
def unsubscribes(draw: st.DrawFn, version: int) -> Unsubscribe:
    return Unsubscribe(draw(packet_id), draw(st.lists(topic_filter, min_size=1, max_size=4)),
                       draw(props_if(version, UNSUBSCRIBE)))


@st.composite
def unsubacks(draw: st.DrawFn, version: int) -> Unsuback:
    if version != 5:
        return Unsuback(draw(packet_id))
    codes = draw(st.lists(st.sampled_from(sorted(codec._UNSUBACK_CODES)), min_size=1, max_size=5))
    return Unsuback(draw(packet_id), codes, draw(props_for(UNSUBACK)))


@st.composite
def disconnects(draw: st.DrawFn, version: int) -> Disconnect:
    if version != 5:
        return Disconnect()
    return Disconnect(draw(st.sampled_from(sorted(codec._DISCONNECT_CODES))), draw(props_for(DISCONNECT)))


@st.composite
def auths(draw: st.DrawFn) -> Auth:
    return Auth(draw(st.sampled_from(sorted(codec._AUTH_CODES))), draw(props_for(AUTH)))


def packets(version: int) -> st.SearchStrategy[Packet]:
    options: list[st.SearchStrategy[Packet]] = [
        connects(version), connacks(version), publishes(version), acks(version),
        subscribes(version), subacks(version), unsubscribes(version), unsubacks(version),
        st.just(Pingreq()), st.just(Pingresp()), disconnects(version),
    ]
    if version == 5:
        options.append(auths())
    return st.one_of(options)


versioned_packet = VERSIONS.flatmap(lambda v: st.tuples(st.just(v), packets(v)))


def _decode_whole(data: bytes, version: int) -> Packet:
    reader = FrameReader()
    reader.feed(data)
    frame = reader.next_frame()
    assert frame is not None and reader.buffered() == 0
    return decode(frame[0], frame[1], 0 if frame[0] >> 4 == CONNECT else version)


# ---------------------------------------------------------------------------


@SETTINGS
@given(versioned_packet)
def test_round_trip(vp: tuple[int, Packet]) -> None:
    version, packet = vp
    data = encode(packet, version)
    assert _decode_whole(data, version) == packet
    # Encoding is a function of the packet: decode -> encode gives the same bytes.
    assert encode(_decode_whole(data, version), version) == data


@SETTINGS
@given(VERSIONS.flatmap(lambda v: st.tuples(st.just(v), publishes(v))))
def test_encode_publish_matches_encode(vp: tuple[int, Publish]) -> None:
    version, p = vp
    assert encode_publish(p.topic, p.payload, p.qos, p.retain, p.dup, p.packet_id, p.props or None,
                          version) == encode(p, version)


@settings(max_examples=200, deadline=None)
@given(VERSIONS.flatmap(lambda v: st.tuples(st.just(v), st.lists(packets(v), min_size=1, max_size=8))),
       st.lists(st.integers(0, 10_000), max_size=12))
def test_split_stream_yields_same_frames(vps: tuple[int, list[Packet]], cuts: list[int]) -> None:
    version, pkts = vps
    stream = b"".join(encode(p, version) for p in pkts)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)])]
    reader = FrameReader()
    frames: list[tuple[int, bytes]] = []
    for chunk in chunks:
        reader.feed(chunk)
        while (f := reader.next_frame()) is not None:
            frames.append((f[0], bytes(f[1])))
    assert reader.buffered() == 0
    assert [bytes((b0,)) + codec.encode_remaining_length(len(body)) + body for b0, body in frames] == \
        [encode(p, version) for p in pkts]
    decoded = [decode(b0, body, 0 if b0 >> 4 == CONNECT else version) for b0, body in frames]
    assert decoded == pkts


def _feed_and_decode(data: bytes, version: int, max_size: int, chunk: int) -> None:
    reader = FrameReader(max_packet_size=max_size)
    try:
        for i in range(0, len(data), chunk):
            reader.feed(data[i:i + chunk])
            while (f := reader.next_frame()) is not None:
                decode(f[0], f[1], version)
    except ProtocolError:
        pass  # the only acceptable failure; anything else propagates and fails the test


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([0, 3, 4, 5]), st.integers(2, 300), st.integers(1, 64))
def test_arbitrary_bytes_raise_only_protocol_error(data: bytes, version: int, max_size: int,
                                                    chunk: int) -> None:
    _feed_and_decode(data, version, max_size, chunk)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, int]:
    # Random bytes rarely get past the first length check; mutating the body of a
    # valid packet and (usually) re-framing it reaches the deep branches
    # (properties, strings, options).
    version, packet = draw(versioned_packet)
    frame = encode(packet, version)
    reader = FrameReader()
    reader.feed(frame)
    parsed = reader.next_frame()
    assert parsed is not None
    byte0, body = parsed[0], bytearray(parsed[1])
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        i = draw(st.integers(0, max(len(body) - 1, 0)))
        if op == "flip" and body:
            body[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and body:
            body[i] = draw(st.integers(0, 255))
        elif op == "insert":
            body.insert(i, draw(st.integers(0, 255)))
        elif body:
            del body[i]
    if draw(st.integers(0, 4)):
        data = bytes((byte0,)) + codec.encode_remaining_length(len(body)) + bytes(body)
    else:
        data = frame[:len(frame) - len(parsed[1])] + bytes(body)  # keep the now-wrong length
    return data, (0 if byte0 >> 4 == CONNECT else version)


@settings(max_examples=500, deadline=None)
@given(mutated(), st.integers(1, 16))
def test_mutated_packets_raise_only_protocol_error(case: tuple[bytes, int], chunk: int) -> None:
    data, version = case
    _feed_and_decode(data, version, 1 << 20, chunk)


@settings(max_examples=300, deadline=None)
@given(mutated())
def test_whatever_decodes_re_encodes_to_itself(case: tuple[bytes, int]) -> None:
    data, version = case
    reader = FrameReader()
    reader.feed(data)
    try:
        frame = reader.next_frame()
        if frame is None:
            return
        packet = decode(frame[0], frame[1], version)
    except ProtocolError:
        return
    if isinstance(packet, Connack) and packet.reason_code:
        packet.session_present = False  # encode enforces [MQTT-3.2.2-6]; the decoder is lenient
    level = packet.protocol_level if isinstance(packet, Connect) else version
    assert _decode_whole(encode(packet, level), level) == packet


@SETTINGS
@given(st.binary(max_size=64), st.integers(0, 255), st.sampled_from([0, 3, 4, 5]))
def test_decode_alone_raises_only_protocol_error(body: bytes, byte0: int, version: int) -> None:
    for b in (body, memoryview(body), bytearray(body)):
        try:
            decode(byte0, b, version)  # type: ignore[arg-type]  # bytearray works too
        except ProtocolError:
            pass
