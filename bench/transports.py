"""End to end through one broker process: QoS 0 msg/s over TCP, WS, TLS and WSS.

Usage: ``python -m bench.transports [--messages N] [--loop uvloop|asyncio]``.
Starts a one-process shoal with every listener on, then for each transport one
subscriber (``bench/#``) and one publisher that writes N small PUBLISH packets in
batches of 100 (over WebSocket each packet is its own frame, as MQTT.js and paho
send them), and times the first to the last delivered message, and the broker's CPU time per
message (from /proc: the number to compare, as it does not depend on the clients). The clients are
plain blocking sockets in two threads; they are cheap next to the broker, but on a
2-core machine they share it: read the ratios between transports, not the
absolute rates.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path

from tests.harness import start_shoal
from tests.integration import rawclient as raw
from tests.integration.pki import make_pki
from tests.wsframes import client_frame, parse_server_frames, upgrade_request

PAYLOAD = b'{"t": 21.5, "h": 40}'
BATCH = 100


class Conn:
    def __init__(self, port: int, ws: bool, ctx: ssl.SSLContext | None) -> None:
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(s, server_hostname="localhost") if ctx else s
        self.ws = ws
        self.raw = b""
        if ws:
            self.sock.sendall(upgrade_request())
            while b"\r\n\r\n" not in self.raw:
                self.raw += self.sock.recv(4096)
            self.raw = self.raw.partition(b"\r\n\r\n")[2]

    def encode(self, packets: list[bytes]) -> bytes:
        if self.ws:
            return b"".join(client_frame(2, p) for p in packets)
        return b"".join(packets)

    def send_packets(self, packets: list[bytes]) -> None:
        self.sock.sendall(self.encode(packets))

    def recv_stream(self) -> bytes:
        chunk = self.sock.recv(262144)
        if not chunk:
            raise EOFError
        if not self.ws:
            return chunk
        self.raw += chunk
        frames, self.raw = parse_server_frames(self.raw)
        return b"".join(p for op, _, p in frames if op in (0, 2))


def run_one(port: int, ws: bool, ctx: ssl.SSLContext | None, n: int,
            tag: str) -> tuple[float, float]:
    sub = Conn(port, ws, ctx)
    sub.send_packets([raw.connect(f"{tag}-s"), raw.subscribe(1, [("bench/#", 0)])])
    pub = Conn(port, ws, ctx)
    pub.send_packets([raw.connect(f"{tag}-p")])
    one = raw.publish("bench/x", PAYLOAD)
    # CONNACK + SUBACK for the subscriber, CONNACK for the publisher
    want = len(raw.packet(0x20, b"\x00\x00")) + 5
    got = b""
    while len(got) < want:
        got += sub.recv_stream()
    pub.sock.recv(4096)
    total = len(one) * n
    done = threading.Event()
    times: list[float] = [time.perf_counter()]

    received = [0]

    def reader() -> None:
        # QoS 0 to a subscriber that cannot keep up is dropped by design: stop at the
        # last message or after 2 s of silence, and report what arrived
        sub.sock.settimeout(2.0)
        try:
            while received[0] < total:
                received[0] += len(sub.recv_stream())
                times.append(time.perf_counter())
        except (TimeoutError, socket.timeout, EOFError):
            pass
        done.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    start = time.perf_counter()
    batch = pub.encode([one] * BATCH)  # masked once: the client's cost stays out of the numbers
    for _ in range(n // BATCH):
        pub.sock.sendall(batch)
    assert done.wait(300), "the reader never finished"
    elapsed = times[-1] - start
    pub.sock.close()
    sub.sock.close()
    delivered = received[0] // len(one)
    return delivered / elapsed, delivered / n


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.transports")
    parser.add_argument("--messages", type=int, default=200000)
    parser.add_argument("--loop", default="uvloop", choices=("uvloop", "asyncio"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(Path(tmp) / "pki")
        tls = {"enabled": True, "bind": "127.0.0.1", "port": 0, "certfile": str(pki.server_cert),
               "keyfile": str(pki.server_key)}
        b = start_shoal(Path(tmp) / "broker", {
            "log": {"level": "WARNING"},
            "mqtt": {"max_queued_messages": 0},
            "listeners": {"tls": tls, "wss": tls,
                          "ws": {"enabled": True, "bind": "127.0.0.1", "port": 0}}},
            loop=args.loop)
        try:
            ctx = ssl.create_default_context(cafile=str(pki.ca))
            rates = {}
            for name, ws, c in (("tcp", False, None), ("ws", True, None), ("tls", False, ctx),
                                ("wss", True, ctx)):
                before = cpu_seconds(b.proc.pid)
                rate, share = run_one(b.ports[name], ws, c, args.messages, name)
                cpu = (cpu_seconds(b.proc.pid) - before) / (args.messages * share) * 1e6
                rates[name] = (rate, share, cpu)
            base, _, base_cpu = rates["tcp"]
            for name, (rate, share, cpu) in rates.items():
                print(f"{name:4s} {rate:9.0f} msg/s ({rate / base:.2f} x tcp), broker CPU "
                      f"{cpu:.2f} µs/msg ({cpu / base_cpu:.2f} x tcp), {share:.1%} delivered")
        finally:
            b.stop()


if __name__ == "__main__":
    main()
