"""The sans-IO WebSocket server codec: handshake, frames, errors. No loop, no sockets."""

from __future__ import annotations

import struct

import pytest

from listeners.websocket import (CLOSED, OPEN, WebSocketError, WebSocketServer, accept_key,
                                 frame_header, unmask)
from tests.wsframes import KEY, client_frame, parse_server_frames, upgrade_request


def opened(**kw: object) -> WebSocketServer:
    ws = WebSocketServer(**kw)  # type: ignore[arg-type]
    assert ws.receive_data(upgrade_request()) == b""
    resp = ws.data_to_send()
    assert resp.startswith(b"HTTP/1.1 101 ")
    assert ws.state == OPEN
    return ws


def test_accept_key_matches_rfc_6455_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_handshake_answers_101_with_accept_and_subprotocol() -> None:
    ws = WebSocketServer()
    assert ws.receive_data(upgrade_request(protocol="mqttv3.1, mqtt")) == b""
    resp = ws.data_to_send().decode()
    assert resp.startswith("HTTP/1.1 101 Switching Protocols\r\n")
    assert f"Sec-WebSocket-Accept: {accept_key(KEY)}\r\n" in resp
    assert "Sec-WebSocket-Protocol: mqtt\r\n" in resp
    assert resp.endswith("\r\n\r\n")


def test_handshake_byte_by_byte_then_frames_in_the_same_chunk() -> None:
    ws = WebSocketServer()
    req = upgrade_request() + client_frame(2, b"\x10\x00")
    out = b""
    for i in range(len(req)):
        out += ws.receive_data(req[i:i + 1])
    assert out == b"\x10\x00"
    ws2 = WebSocketServer()
    assert ws2.receive_data(req) == b"\x10\x00"


@pytest.mark.parametrize("req, status", [
    (upgrade_request(protocol=None), 400),
    (upgrade_request(protocol="chat"), 400),
    (upgrade_request(path="/other"), 404),
    (upgrade_request(key="short"), 400),
    (upgrade_request().replace(b"GET", b"POST"), 405),
    (upgrade_request().replace(b"Version: 13", b"Version: 8"), 426),
    (upgrade_request().replace(b"Upgrade: websocket", b"Upgrade: h2c"), 426),
    (upgrade_request().replace(b"Connection: Upgrade", b"Connection: close"), 400),
    (upgrade_request().replace(b"HTTP/1.1", b"HTTP/1.0"), 400),
    (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", 400),
    (b"GET /mqtt HTTP/1.1\r\nbad header line\r\n\r\n", 400),
])
def test_bad_upgrade_requests_get_an_http_error(req: bytes, status: int) -> None:
    ws = WebSocketServer()
    with pytest.raises(WebSocketError) as info:
        ws.receive_data(req)
    assert info.value.code == status
    assert ws.data_to_send().startswith(f"HTTP/1.1 {status} ".encode())
    assert ws.closed
    assert ws.receive_data(b"more") == b""  # after the refusal nothing is read


def test_request_head_is_bounded() -> None:
    ws = WebSocketServer()
    with pytest.raises(WebSocketError) as info:
        ws.receive_data(b"GET /mqtt HTTP/1.1\r\nX: " + b"a" * 9000)
    assert info.value.code == 431


def test_binary_and_fragmented_frames_form_one_stream() -> None:
    ws = opened()
    data = client_frame(2, b"ab", fin=False) + client_frame(9, b"hi") + client_frame(0, b"cd", fin=False)
    assert ws.receive_data(data) == b"abcd"
    frames, rest = parse_server_frames(ws.data_to_send())
    assert frames == [(0xA, True, b"hi")] and rest == b""  # ping answered inside a message
    assert ws.receive_data(client_frame(0, b"ef")) == b"ef"
    assert ws.receive_data(client_frame(2, b"gh")) == b"gh"  # a new message after the final one


def test_frames_split_anywhere_reassemble() -> None:
    payload = bytes(range(256)) * 300  # 64-bit... no: 16-bit length field
    big = bytes(70000)  # 64-bit length field
    data = client_frame(2, payload) + client_frame(2, big) + client_frame(2, b"x")
    for step in (1, 3, 7, 1000, len(data)):
        ws = opened()
        got = b"".join(ws.receive_data(data[i:i + step]) for i in range(0, len(data), step))
        assert got == payload + big + b"x"


def test_close_handshake_echoes_the_code() -> None:
    ws = opened()
    assert ws.receive_data(client_frame(8, struct.pack("!H", 1001) + b"bye") + client_frame(2, b"late")) == b""
    frames, _ = parse_server_frames(ws.data_to_send())
    assert frames == [(8, True, struct.pack("!H", 1001))]
    assert ws.closed and ws.close_code == 1001


def test_empty_close_is_answered_1000() -> None:
    ws = opened()
    ws.receive_data(client_frame(8))
    assert parse_server_frames(ws.data_to_send())[0] == [(8, True, struct.pack("!H", 1000))]


def test_server_close_sends_close_frame() -> None:
    ws = opened()
    ws.close()
    assert parse_server_frames(ws.data_to_send())[0] == [(8, True, struct.pack("!H", 1000))]
    assert ws.state == CLOSED


@pytest.mark.parametrize("frame, code", [
    (client_frame(1, b"text"), 1003),
    (client_frame(2, b"x", masked=False), 1002),
    (client_frame(2, b"x", rsv=4), 1002),
    (client_frame(0, b"x"), 1002),
    (client_frame(3, b"x"), 1002),
    (client_frame(0xB, b"x"), 1002),
    (client_frame(9, b"x", fin=False), 1002),
    (client_frame(9, b"x" * 126), 1002),
    (client_frame(8, b"\x03"), 1002),
    (client_frame(8, struct.pack("!H", 999)), 1002),
    (client_frame(8, struct.pack("!H", 1005)), 1002),
    (client_frame(8, struct.pack("!H", 1000) + b"\xff"), 1007),
    (client_frame(2, b"", length=3_000_000)[:14], 1009),
    (client_frame(2, b"a", fin=False) + client_frame(2, b"b"), 1002),
    (bytes((0x82, 0xFF)) + struct.pack("!Q", 1 << 63), 1002),
])
def test_bad_frames_close_with_the_right_code(frame: bytes, code: int) -> None:
    ws = opened()
    with pytest.raises(WebSocketError) as info:
        ws.receive_data(frame)
    assert info.value.code == code
    frames, _ = parse_server_frames(ws.data_to_send())
    assert frames[-1][0] == 8 and struct.unpack("!H", frames[-1][2][:2])[0] == code
    assert ws.closed


def test_max_frame_size_is_checked_from_the_header() -> None:
    ws = opened(max_frame_size=1000)
    assert ws.receive_data(client_frame(2, b"a" * 1000)) == b"a" * 1000
    with pytest.raises(WebSocketError) as info:
        ws.receive_data(client_frame(2, b"a" * 1001)[:4])  # refused before the payload arrives
    assert info.value.code == 1009


def test_unmask_and_frame_header() -> None:
    mask = b"\x01\x02\x03\x04"
    data = bytes(range(11))
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    assert unmask(masked, mask) == data
    assert unmask(b"", mask) == b""
    assert frame_header(2, 5) == b"\x82\x05"
    assert frame_header(2, 300) == b"\x82\x7e\x01\x2c"
    assert frame_header(2, 70000) == b"\x82\x7f" + struct.pack("!Q", 70000)


@pytest.mark.parametrize("n", [1, 3, 4, 5, 767, 768, 769, 770, 771, 1025, 70001])
def test_unmask_both_paths_match_the_definition(n: int) -> None:
    mask = b"\xa1\x02\xf3\x44"
    data = bytes((i * 7) & 0xFF for i in range(n))
    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    assert unmask(data, mask) == expected
    assert unmask(memoryview(bytearray(b"xx" + data))[2:], mask) == expected  # unaligned view
