"""Microbenchmark of the WebSocket layer: what WS costs per MQTT packet over plain TCP.

Usage: ``python -m bench.micro_ws [--number N]``. Prints µs per MQTT packet, the
best of 5 timeit repeats. On plain TCP the listener layer costs nothing (bytes go
straight to the MQTT reader), so the baseline is the MQTT reader's own split of
the same packets; the WS rows add the codec's decode (parse, unmask, join) or
encode (frame header + payload) on top. Shapes:

- ``1/frame``: one PUBLISH per WebSocket frame, as MQTT.js and paho send, read in
  chunks of 100 frames (a busy connection's read);
- ``100/frame``: 100 PUBLISH packets in one frame (a client that batches);
- ``single``: one frame per read (an idle connection's read);
- encode: one frame around one turn's output of 1 or 100 packets.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable

from listeners.websocket import OP_BINARY, WebSocketServer, frame_header
from shards.protocol.codec import encode_publish
from shards.protocol.reader import FrameReader
from tests.wsframes import client_frame, upgrade_request

TOPIC = "sensors/building-7/floor-3/room-12/temperature"
SMALL = b'{"t": 21.5, "h": 40}'
KB = bytes(range(256)) * 4


def _opened() -> WebSocketServer:
    ws = WebSocketServer()
    ws.receive_data(upgrade_request())
    ws.data_to_send()
    return ws


def _split(data: bytes) -> None:
    reader = FrameReader()
    reader.feed(data)
    while reader.next_frame() is not None:
        pass


def cases() -> list[tuple[str, int, Callable[[], object]]]:
    """(name, MQTT packets per call, callable)."""
    out: list[tuple[str, int, Callable[[], object]]] = []
    for label, payload in (("small", SMALL), ("1KiB", KB)):
        pkt = encode_publish(TOPIC, payload, 1, False, False, 7, None, 4)
        tcp_batch = pkt * 100
        ws_per_packet = client_frame(OP_BINARY, pkt) * 100
        ws_one_frame = client_frame(OP_BINARY, tcp_batch)
        ws_single = client_frame(OP_BINARY, pkt)
        ws = _opened()

        def ws_then_split(chunk: bytes, ws: WebSocketServer = ws) -> None:
            _split(ws.receive_data(chunk))

        out += [
            (f"tcp   split 100 pkts        {label}", 100, lambda b=tcp_batch: _split(b)),
            (f"ws    decode 1/frame x100   {label}", 100, lambda c=ws_per_packet, w=ws: w.receive_data(c)),
            (f"ws    decode 100/frame      {label}", 100, lambda c=ws_one_frame, w=ws: w.receive_data(c)),
            (f"ws    decode single         {label}", 1, lambda c=ws_single, w=ws: w.receive_data(c)),
            (f"ws+   decode+split 1/frame  {label}", 100, lambda c=ws_per_packet: ws_then_split(c)),
            (f"ws    encode 1 pkt          {label}", 1,
             lambda p=pkt: frame_header(OP_BINARY, len(p)) + p),
            (f"ws    encode 100 pkts/turn  {label}", 100,
             lambda p=tcp_batch: frame_header(OP_BINARY, len(p)) + p),
        ]
    return out


def wsproto_cases() -> list[tuple[str, int, Callable[[], object]]]:
    """The same 100-frame chunks through wsproto, events drained: the alternative considered."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request

    out: list[tuple[str, int, Callable[[], object]]] = []
    for label, payload in (("small", SMALL), ("1KiB", KB)):
        pkt = encode_publish(TOPIC, payload, 1, False, False, 7, None, 4)
        chunk = client_frame(OP_BINARY, pkt) * 100
        conn = WSConnection(ConnectionType.SERVER)
        conn.receive_data(upgrade_request())
        for event in conn.events():
            if isinstance(event, Request):
                conn.send(AcceptConnection(subprotocol="mqtt"))

        def run(c: bytes = chunk, w: WSConnection = conn) -> None:
            w.receive_data(c)
            for _ in w.events():
                pass

        out.append((f"wsproto decode 1/frame x100 {label}", 100, run))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.micro_ws")
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--wsproto", action="store_true",
                        help="also time wsproto (if installed) on the 1/frame chunks")
    args = parser.parse_args(argv)
    rows = cases() + (wsproto_cases() if args.wsproto else [])
    for name, per, fn in rows:
        best = min(timeit.repeat(fn, number=args.number, repeat=5)) / args.number
        print(f"{name:40s} {best * 1e6 / per:8.3f} µs/packet")


if __name__ == "__main__":
    main()
