"""FrameReader: cutting a byte stream into (byte0, body) frames."""

from __future__ import annotations

import pytest

from shards.protocol.codec import encode_remaining_length
from shards.protocol.errors import ProtocolError, Reason
from shards.protocol.reader import MAX_PACKET_SIZE, FrameReader


def frame(byte0: int, body: bytes) -> bytes:
    return bytes((byte0,)) + encode_remaining_length(len(body)) + body


def drain(reader: FrameReader) -> list[tuple[int, bytes]]:
    out = []
    while (f := reader.next_frame()) is not None:
        out.append((f[0], bytes(f[1])))
    return out


def test_empty_reader() -> None:
    r = FrameReader()
    assert r.next_frame() is None
    assert r.buffered() == 0
    r.feed(b"")
    assert r.next_frame() is None
    assert r.max_packet_size == MAX_PACKET_SIZE == 268_435_460


def test_many_packets_in_one_feed() -> None:
    stream = b"".join(frame(0x30, b"\x00\x01a" + bytes([i])) for i in range(50)) + b"\xc0\x00"
    r = FrameReader()
    r.feed(stream)
    assert r.buffered() == len(stream)
    frames = drain(r)
    assert len(frames) == 51
    assert frames[7] == (0x30, b"\x00\x01a\x07")
    assert frames[-1] == (0xC0, b"")
    assert r.buffered() == 0


def test_byte_by_byte() -> None:
    packets = [frame(0x30, b"\x00\x01a" + b"x" * n) for n in (0, 1, 126, 127, 200, 20000)]
    stream = b"".join(packets)
    r = FrameReader()
    got = []
    for i in range(len(stream)):
        r.feed(stream[i:i + 1])
        got += drain(r)
    assert [frame(b0, body) for b0, body in got] == packets
    assert r.buffered() == 0


def test_header_split_across_chunks() -> None:
    body = b"\x00\x01a" + b"y" * 300  # two-byte remaining length
    pkt = frame(0x31, body)
    for cut in range(1, 4):
        r = FrameReader()
        r.feed(pkt[:cut])
        assert r.next_frame() is None
        r.feed(pkt[cut:])
        assert drain(r) == [(0x31, body)]


def test_large_body_is_a_memoryview_and_small_body_bytes() -> None:
    r = FrameReader()
    r.feed(frame(0x30, b"\x00\x01a" + b"z" * 5000) + frame(0x30, b"\x00\x01a"))
    big = r.next_frame()
    small = r.next_frame()
    assert big is not None and small is not None
    assert isinstance(big[1], memoryview) and len(big[1]) == 5003
    assert isinstance(small[1], bytes)


def test_bytearray_feed_is_copied() -> None:
    buf = bytearray(frame(0x30, b"\x00\x01ab"))
    r = FrameReader()
    r.feed(buf)  # type: ignore[arg-type]
    buf[:] = b"\x00" * len(buf)
    assert drain(r) == [(0x30, b"\x00\x01ab")]


def test_remaining_length_limits() -> None:
    r = FrameReader()
    r.feed(b"\x30\xff\xff\xff\x7f")  # 268 435 455: the largest legal value
    assert r.next_frame() is None
    r = FrameReader()
    r.feed(b"\x30\xff\xff\xff\xff")
    with pytest.raises(ProtocolError) as e:
        r.next_frame()
    assert e.value.reason == Reason.MALFORMED_PACKET


def test_packet_too_large_before_body_arrives() -> None:
    r = FrameReader(max_packet_size=100)
    r.feed(b"\x30\x80\x01")  # remaining length 128: 131 bytes in all
    with pytest.raises(ProtocolError) as e:
        r.next_frame()
    assert e.value.reason == Reason.PACKET_TOO_LARGE


def test_packet_size_limit_includes_fixed_header() -> None:
    body = b"\x00\x01a" + b"x" * 95  # 98 + 2 = 100 bytes in all
    r = FrameReader(max_packet_size=100)
    r.feed(frame(0x30, body))
    assert drain(r) == [(0x30, body)]
    r = FrameReader(max_packet_size=99)
    r.feed(frame(0x30, body))
    with pytest.raises(ProtocolError) as e:
        r.next_frame()
    assert e.value.reason == Reason.PACKET_TOO_LARGE


def test_packet_too_large_with_one_byte_header_only() -> None:
    r = FrameReader(max_packet_size=10)
    r.feed(b"\x30\x7f")
    with pytest.raises(ProtocolError) as e:
        r.next_frame()
    assert e.value.reason == Reason.PACKET_TOO_LARGE


def test_limit_changed_between_feeds() -> None:
    r = FrameReader()
    r.feed(b"\x30\x80\x01" + b"x" * 10)
    assert r.next_frame() is None
    r.max_packet_size = 64
    with pytest.raises(ProtocolError) as e:
        r.next_frame()
    assert e.value.reason == Reason.PACKET_TOO_LARGE


@pytest.mark.parametrize("data", [b"\x00", b"\x00\x00", b"\x0f\x00", b"\x00\x80"])
def test_reserved_type_zero(data: bytes) -> None:
    r = FrameReader()
    r.feed(data)
    with pytest.raises(ProtocolError) as e:
        r.next_frame()
    assert e.value.reason == Reason.MALFORMED_PACKET


def test_failed_reader_stays_failed() -> None:
    r = FrameReader()
    r.feed(b"\x30\xff\xff\xff\xff\x01")
    with pytest.raises(ProtocolError) as first:
        r.next_frame()
    r.feed(frame(0xC0, b""))
    with pytest.raises(ProtocolError) as second:
        r.next_frame()
    assert second.value is first.value
    assert r.buffered() == 0


def test_slow_trickle_of_a_large_packet() -> None:
    body = b"\x00\x01a" + bytes(range(256)) * 400
    pkt = frame(0x30, body)
    r = FrameReader()
    for i in range(0, len(pkt), 7):
        assert r.next_frame() is None
        r.feed(pkt[i:i + 7])
    got = r.next_frame()
    assert got is not None and got[0] == 0x30 and bytes(got[1]) == body
    assert r.next_frame() is None


def test_frame_then_partial_then_rest() -> None:
    a = frame(0x30, b"\x00\x01a1")
    b = frame(0x30, b"\x00\x01b" + b"2" * 50)
    r = FrameReader()
    r.feed(a + b[:10])
    assert drain(r) == [(0x30, b"\x00\x01a1")]
    assert r.buffered() == 10
    r.feed(b[10:30])
    assert r.next_frame() is None
    r.feed(b[30:] + a)
    assert drain(r) == [(0x30, b"\x00\x01b" + b"2" * 50), (0x30, b"\x00\x01a1")]


def test_a_stream_that_never_drains_keeps_few_chunks() -> None:
    # every read ends inside a packet, so the buffer is never empty: used-up chunks must
    # still be let go of
    r = FrameReader()
    packet = b"\x30\x0a\x00\x03a/b" + b"x" * 5  # 12 bytes
    stream = packet * 5000
    got = 0
    for i in range(0, len(stream), 7):
        r.feed(stream[i:i + 7])
        while r.next_frame() is not None:
            got += 1
        assert len(r._chunks) - r._first <= 3 and len(r._chunks) <= 40
    assert got == 5000


def test_a_big_packet_in_one_byte_reads_is_linear() -> None:
    # 200,000 one-byte chunks joined once: quadratic chunk removal would take minutes
    body = bytes(range(256)) * 781 + b"\x00" * 64  # 200,000 bytes
    data = b"\x30" + bytes([0x80 | (len(body) & 0x7F), 0x80 | ((len(body) >> 7) & 0x7F),
                            len(body) >> 14]) + body
    r = FrameReader(len(data))
    for i in range(len(data)):
        r.feed(data[i:i + 1])
    frame = r.next_frame()
    assert frame is not None and bytes(frame[1]) == body and r.buffered() == 0
    assert r._chunks == [] and r._first == 0
