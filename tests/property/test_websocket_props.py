"""The WebSocket codec under arbitrary input (hypothesis) and the tricky-frame corpus.

Any bytes, before or after the upgrade, either give stream bytes or raise the
codec's own :class:`WebSocketError`, never anything else; valid frames give the
same stream however the bytes are split.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from listeners.websocket import WebSocketError, WebSocketServer
from tests.wsframes import client_frame, parse_server_frames, upgrade_request

CORPUS = Path(__file__).resolve().parent.parent / "corpus" / "websocket.json"
ENTRIES: list[dict[str, Any]] = json.loads(CORPUS.read_text())


def opened() -> WebSocketServer:
    ws = WebSocketServer(max_frame_size=4096)
    ws.receive_data(upgrade_request())
    ws.data_to_send()
    return ws


def feed_all(ws: WebSocketServer, chunks: list[bytes]) -> bytes:
    out = b""
    try:
        for chunk in chunks:
            out += ws.receive_data(chunk)
    except WebSocketError:
        assert ws.closed
        assert ws.data_to_send()  # an HTTP error or a close frame is always queued
    return out


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_any_bytes_after_the_upgrade(chunks: list[bytes]) -> None:
    feed_all(opened(), chunks)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=4))
def test_any_bytes_as_the_upgrade(chunks: list[bytes]) -> None:
    feed_all(WebSocketServer(), chunks)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([
    b"GET /mqtt HTTP/1.1\r\n", b"Upgrade: websocket\r\n", b"Connection: Upgrade\r\n",
    b"Sec-WebSocket-Version: 13\r\n", b"Sec-WebSocket-Protocol: mqtt\r\n",
    b"Sec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\n", b"\r\n", b":", b" ", b"\x00"]), max_size=12))
def test_header_soup(parts: list[bytes]) -> None:
    feed_all(WebSocketServer(), [b"".join(parts)])


frames = st.tuples(st.sampled_from([0, 1, 2, 8, 9, 10, 3]), st.binary(max_size=300),
                   st.booleans(), st.booleans(), st.integers(0, 7))


@settings(max_examples=400, deadline=None)
@given(st.lists(frames, max_size=6), st.integers(1, 50))
def test_structured_frames_split_anywhere(spec: list[tuple[int, bytes, bool, bool, int]],
                                          step: int) -> None:
    data = b"".join(client_frame(op, p, fin=fin, masked=m, rsv=rsv) for op, p, fin, m, rsv in spec)
    whole = opened()
    a = feed_all(whole, [data])
    split = opened()
    b = feed_all(split, [data[i:i + step] for i in range(0, len(data), step)])
    assert whole.state == split.state and whole.close_code == split.close_code
    # a chunk that ends in a violation delivers none of its bytes (the connection is
    # over); smaller chunks may have delivered the good frames before it
    assert b.startswith(a) and (a == b or whole.closed)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=3000), max_size=5), st.integers(1, 700))
def test_valid_binary_stream_is_delivered_whole(payloads: list[bytes], step: int) -> None:
    data = b"".join(client_frame(2, p) for p in payloads)
    ws = opened()
    got = b"".join(ws.receive_data(data[i:i + step]) for i in range(0, len(data), step))
    assert got == b"".join(payloads) and not ws.closed


def test_corpus_shape() -> None:
    names = [e["name"] for e in ENTRIES]
    assert len(names) == len(set(names)) and len(ENTRIES) >= 25
    for e in ENTRIES:
        assert set(e) == {"name", "handshake", "hex", "code", "note"}, e["name"]


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_corpus_entry(entry: dict[str, Any]) -> None:
    data = bytes.fromhex(entry["hex"])
    for feeds in ([data], [data[i:i + 1] for i in range(len(data))]):
        ws = WebSocketServer()
        if entry["handshake"]:
            ws.receive_data(upgrade_request())
            ws.data_to_send()
        with pytest.raises(WebSocketError) as info:
            for chunk in feeds:
                ws.receive_data(chunk)
        assert info.value.code == entry["code"]
        out = ws.data_to_send()
        if entry["handshake"]:
            frames, _ = parse_server_frames(out)
            assert frames[-1][0] == 8 and struct.unpack("!H", frames[-1][2][:2])[0] == entry["code"]
        else:
            assert out.startswith(f"HTTP/1.1 {entry['code']} ".encode())
