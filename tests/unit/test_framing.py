"""Bus framing (router/framing.py): the frame decoder and the HELLO, PUBLISH and CONTROL codecs."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.framing import (
    BUS_VERSION, CONTROL, FLAG_RETAIN_ONLY, FLAG_SHARED, HELLO, MAX_FRAME_SIZE, PUBLISH,
    BusProtocolError, FrameDecoder, Hello, PublishFrame, decode_control, decode_hello,
    decode_publish, encode_control, encode_frame, encode_hello, encode_publish, frame_header,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def drain(dec: FrameDecoder) -> list[tuple[int, bytes]]:
    return [(t, bytes(b)) for t, b in dec]


def pub(**kw: object) -> PublishFrame:
    fields: dict[str, object] = dict(msg_id=7, topic="a/b", payload=b"hello", qos=1, retain=False,
                                     origin="client-1", expires_at=None, props=b"", flags=0)
    fields.update(kw)
    return PublishFrame(**fields)  # type: ignore[arg-type]


def roundtrip(f: PublishFrame) -> PublishFrame:
    body = encode_publish(f.msg_id, f.topic, f.payload, f.qos, f.retain, f.origin, f.expires_at,
                          f.props, f.flags, f.group)
    return decode_publish(body)


# -- frame decoder -----------------------------------------------------------------------------

def test_frame_layout() -> None:
    assert encode_frame(PUBLISH, b"abc") == b"\x00\x00\x00\x04\x02abc"
    assert frame_header(CONTROL, 3) == b"\x00\x00\x00\x04\x03"
    assert (HELLO, PUBLISH, CONTROL) == (1, 2, 3)
    assert MAX_FRAME_SIZE == 64 * 1024 * 1024


def test_empty_decoder() -> None:
    d = FrameDecoder()
    assert d.next() is None
    d.feed(b"")
    assert d.next() is None and d.buffered() == 0
    assert list(d) == []


def test_many_frames_in_one_feed() -> None:
    frames = [(PUBLISH, bytes([i]) * i) for i in range(60)] + [(CONTROL, b"")]
    d = FrameDecoder()
    d.feed(b"".join(encode_frame(t, b) for t, b in frames))
    assert drain(d) == frames
    assert d.buffered() == 0 and d.next() is None


def test_byte_by_byte() -> None:
    stream = encode_frame(PUBLISH, b"x" * 300) + encode_frame(9, b"yz")
    d = FrameDecoder()
    out = []
    for i in range(len(stream)):
        d.feed(stream[i:i + 1])
        out += drain(d)
    assert out == [(PUBLISH, b"x" * 300), (9, b"yz")]


def test_iteration_and_next_agree() -> None:
    d = FrameDecoder()
    d.feed(encode_frame(CONTROL, b"{}") + encode_frame(PUBLISH, b"p"))
    assert d.next() == (CONTROL, b"{}")
    assert next(iter(d)) == (PUBLISH, b"p")
    with pytest.raises(StopIteration):
        next(d)


def test_small_bodies_are_bytes_large_are_views() -> None:
    big = bytes(range(256)) * 40
    d = FrameDecoder()
    d.feed(encode_frame(PUBLISH, b"small") + encode_frame(PUBLISH, big))
    (t1, b1), (t2, b2) = list(d)
    assert type(b1) is bytes and isinstance(b2, memoryview)
    assert bytes(b2) == big
    # A large frame split across feeds is joined once and still comes back whole.
    d.feed(encode_frame(PUBLISH, big)[:100])
    assert d.next() is None and d.buffered() == 100
    d.feed(encode_frame(PUBLISH, big)[100:])
    t, b = d.next()  # type: ignore[misc]
    assert bytes(b) == big


def test_bytearray_and_memoryview_input_is_copied() -> None:
    buf = bytearray(encode_frame(PUBLISH, b"abc"))
    d = FrameDecoder()
    d.feed(buf)
    buf[5:] = b"zzz"  # a reused receive buffer changes under us
    assert d.next() == (PUBLISH, b"abc")
    d.feed(memoryview(encode_frame(CONTROL, b"q")))
    assert d.next() == (CONTROL, b"q")


def test_oversized_frame_refused_from_its_header() -> None:
    d = FrameDecoder(max_frame_size=1000)
    d.feed(struct.pack(">IB", 1001, PUBLISH))  # only the header: the body never needs to arrive
    with pytest.raises(BusProtocolError, match="exceeds"):
        d.next()
    assert d.failed
    d.feed(encode_frame(PUBLISH, b"ok"))  # ignored: the link is closing
    assert d.buffered() == 0
    with pytest.raises(BusProtocolError):
        d.next()
    with pytest.raises(BusProtocolError):
        list(d)


def test_frame_at_the_limit_passes() -> None:
    d = FrameDecoder(max_frame_size=1000)
    d.feed(encode_frame(PUBLISH, b"x" * 999))
    t, b = d.next()  # type: ignore[misc]
    assert len(b) == 999


def test_default_limit() -> None:
    d = FrameDecoder()
    d.feed(struct.pack(">IB", MAX_FRAME_SIZE + 1, PUBLISH))
    with pytest.raises(BusProtocolError):
        d.next()
    d = FrameDecoder()
    d.feed(struct.pack(">IB", MAX_FRAME_SIZE, PUBLISH))
    assert d.next() is None  # legal, waiting for the body


def test_zero_length_is_an_error() -> None:
    d = FrameDecoder()
    d.feed(b"\x00\x00\x00\x00\x02")
    with pytest.raises(BusProtocolError, match="no type"):
        d.next()


def test_header_cut_across_chunks() -> None:
    stream = encode_frame(PUBLISH, b"a" * 10) + encode_frame(CONTROL, b"b" * 10)
    d = FrameDecoder()
    d.feed(stream[:17])  # first frame (15) + 2 bytes of the second header
    assert d.next() == (PUBLISH, b"a" * 10)
    assert d.next() is None
    d.feed(stream[17:19])
    assert d.next() is None
    d.feed(stream[19:])
    assert d.next() == (CONTROL, b"b" * 10)


frames_st = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=3000)), max_size=12)


@SETTINGS
@given(frames=frames_st, cuts=st.lists(st.integers(0, 40_000), max_size=20))
def test_any_split_decodes_identically(frames: list[tuple[int, bytes]], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(t, b) for t, b in frames)
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    d = FrameDecoder()
    out = []
    for a, b in zip(points, points[1:]):
        d.feed(stream[a:b])
        out += drain(d)
    assert out == frames
    assert d.buffered() == 0


@SETTINGS
@given(data=st.binary(max_size=2000), limit=st.integers(1, 4000))
def test_random_bytes_raise_only_bus_protocol_error(data: bytes, limit: int) -> None:
    d = FrameDecoder(max_frame_size=limit)
    d.feed(data)
    try:
        for ftype, body in d:
            assert len(body) < limit
            for decode in (decode_publish, decode_hello, decode_control):
                try:
                    decode(body)
                except BusProtocolError:
                    pass
    except BusProtocolError:
        assert d.failed


@SETTINGS
@given(body=st.binary(max_size=300))
def test_body_decoders_raise_only_bus_protocol_error(body: bytes) -> None:
    for decode in (decode_publish, decode_hello, decode_control):
        for b in (body, memoryview(body)):
            try:
                decode(b)
            except BusProtocolError:
                pass


# -- HELLO -------------------------------------------------------------------------------------

def test_hello_roundtrip() -> None:
    h = decode_hello(encode_hello(3, 5, epoch=2**63 + 1, pid=4242))
    assert h == Hello(BUS_VERSION, 3, 5, 4242, 2**63 + 1)
    assert (h.index, h.peer, h.pid, h.epoch) == (3, 5, 4242, 2**63 + 1)


def test_hello_errors() -> None:
    body = encode_hello(0, 1, 99)
    with pytest.raises(BusProtocolError, match="version"):
        decode_hello(bytes([BUS_VERSION + 1]) + body[1:])
    with pytest.raises(BusProtocolError):
        decode_hello(body[:-1])
    with pytest.raises(BusProtocolError):
        decode_hello(body + b"\x00")
    with pytest.raises(ValueError):
        encode_hello(70_000, 1, 0)


# -- PUBLISH -----------------------------------------------------------------------------------

@pytest.mark.parametrize("frame", [
    pub(),
    pub(topic="€/温度/🌡️/ü", origin="клиент", payload=b"", qos=0),
    pub(payload=b"\x00\xff" * 3_000_000, qos=2, retain=True),  # 6 MB: arrives as a memoryview
    pub(topic="", origin="", props=b""),
    pub(expires_at=1_700_000_000.25, props=b"\x01\x01\x23\x00\x07"),
    pub(expires_at=0.0),
    pub(flags=FLAG_SHARED, group="grüppe", retain=False),
    pub(flags=FLAG_RETAIN_ONLY, retain=True, payload=b"retained"),
    pub(msg_id=2**64 - 1),
    pub(topic="t" * 65535, origin="o" * 65535),
], ids=["plain", "unicode-empty-payload", "big", "empties", "expiry-props", "expiry-zero",
        "shared", "retain-only", "max-id", "max-lengths"])
def test_publish_roundtrip(frame: PublishFrame) -> None:
    assert roundtrip(frame) == frame
    body = encode_publish(frame.msg_id, frame.topic, frame.payload, frame.qos, frame.retain,
                          frame.origin, frame.expires_at, frame.props, frame.flags, frame.group)
    # Through the decoder, as the bus delivers it (bytes or a memoryview by size).
    d = FrameDecoder()
    stream = encode_frame(PUBLISH, body)
    half = len(stream) // 2
    d.feed(stream[:half])
    d.feed(stream[half:])
    ftype, got = d.next()  # type: ignore[misc]
    out = decode_publish(got)
    assert ftype == PUBLISH and out == frame
    assert type(out.payload) is bytes and type(out.props) is bytes
    assert type(out.topic) is str and type(out.retain) is bool


def test_publish_no_expiry_is_none_not_zero() -> None:
    assert roundtrip(pub(expires_at=None)).expires_at is None
    assert roundtrip(pub(expires_at=0.0)).expires_at == 0.0


@pytest.mark.parametrize("kw", [
    dict(qos=3), dict(qos=-1), dict(flags=8), dict(flags=FLAG_SHARED),  # shared needs a group
    dict(group="g"),  # a group needs FLAG_SHARED
    dict(topic="t" * 65536), dict(origin="o" * 65536), dict(msg_id=-1), dict(msg_id=2**64),
    dict(topic="\ud800"),  # a lone surrogate has no UTF-8 form
])
def test_publish_encode_rejects(kw: dict[str, object]) -> None:
    f = pub(**kw)
    with pytest.raises(ValueError):
        encode_publish(f.msg_id, f.topic, f.payload, f.qos, f.retain, f.origin, f.expires_at,
                       f.props, f.flags, f.group)


def test_publish_decode_rejects() -> None:
    good = encode_publish(1, "a/b", b"pay", 1, False, "c", None, b"pp", 0)
    with pytest.raises(BusProtocolError):
        decode_publish(good[:10])  # shorter than the header
    with pytest.raises(BusProtocolError):
        decode_publish(good[:30])  # strings run past the end
    bad_qos = bytearray(good)
    bad_qos[16] |= 3
    with pytest.raises(BusProtocolError):
        decode_publish(bytes(bad_qos))
    bad_flags = bytearray(good)
    bad_flags[17] = FLAG_SHARED  # shared without a group
    with pytest.raises(BusProtocolError):
        decode_publish(bytes(bad_flags))
    bad_utf8 = good.replace(b"a/b", b"a\xffb")
    with pytest.raises(BusProtocolError, match="UTF-8"):
        decode_publish(bad_utf8)


text = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)


@SETTINGS
@given(msg_id=st.integers(0, 2**64 - 1), topic=text, payload=st.binary(max_size=3000),
       qos=st.integers(0, 2), retain=st.booleans(), origin=text,
       expires_at=st.none() | st.floats(allow_nan=False), props=st.binary(max_size=50),
       retain_only=st.booleans(), group=text)
def test_publish_roundtrip_property(msg_id: int, topic: str, payload: bytes, qos: int,
                                    retain: bool, origin: str, expires_at: float | None,
                                    props: bytes, retain_only: bool, group: str) -> None:
    flags = (FLAG_RETAIN_ONLY if retain_only else 0) | (FLAG_SHARED if group else 0)
    f = PublishFrame(msg_id, topic, payload, qos, retain, origin, expires_at, props, flags, group)
    assert roundtrip(f) == f
    body = encode_publish(msg_id, topic, payload, qos, retain, origin, expires_at, props, flags,
                          group)
    assert decode_publish(memoryview(body)) == f


# -- CONTROL -----------------------------------------------------------------------------------

def test_control_roundtrip() -> None:
    msg = {"op": "claim", "client_id": "ü-1", "shard": 3, "subs": [["a/#", 1]], "x": None}
    assert decode_control(encode_control(msg)) == msg
    assert decode_control(memoryview(encode_control(msg))) == msg


def test_control_errors() -> None:
    with pytest.raises(BusProtocolError, match="object"):
        decode_control(b"[1, 2]")
    with pytest.raises(BusProtocolError, match="JSON"):
        decode_control(b"{nope")
    with pytest.raises(BusProtocolError):
        decode_control(b"\xff\xfe")
