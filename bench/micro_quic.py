"""What the QUIC layer costs the server per message, without sockets.

An aioquic client and the shard's QUIC endpoint (listeners/quic.py) exchange datagrams in
memory; the endpoint's stream application just counts bytes. Measures, per 64-byte MQTT
PUBLISH (QoS 0, 66 bytes on the wire), the server's CPU time for:

* inbound: the client writes a batch of PUBLISHes per round on the control stream; the
  server decrypts, reassembles and hands the bytes to the stream protocol;
* outbound: the server writes a batch per round on the stream; encrypts and packetises.

Batch sizes 1 (one message per datagram, the worst case) and 50 (a busy connection: many
messages per datagram, as the per-turn flush produces). The TCP path's equivalent cost is a
read or write syscall shared by the batch, so this is the price of QUIC in pure Python.

Run: python -m bench.micro_quic
"""

from __future__ import annotations

import asyncio
import ssl
import tempfile
import time
from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from listeners.quic import ALPN, ConnectionApp, Endpoint, QuicStream, ensure_self_signed, server_configuration

PUBLISH = b"\x30\x40\x00\x03a/b" + b"x" * 59  # 66 bytes
SERVER = ("10.0.0.2", 14567)
CLIENT = ("10.0.0.1", 40000)


class _Count(asyncio.Protocol):
    def __init__(self) -> None:
        self.bytes = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)


class _App(ConnectionApp):
    def __init__(self) -> None:
        self.proto = _Count()

    def control_stream(self, stream: QuicStream) -> asyncio.Protocol:
        return self.proto


class _Out:
    def __init__(self) -> None:
        self.datagrams: list[bytes] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        self.datagrams.append(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return SERVER if name == "sockname" else default


def _pair(config: Any) -> tuple[QuicConnection, Endpoint, _Out, list[_App]]:
    loop = asyncio.new_event_loop()
    apps: list[_App] = []

    def new_app(conn: Any) -> _App:
        apps.append(_App())
        return apps[-1]

    ep = Endpoint(loop, config, new_app)
    out = _Out()
    ep.connection_made(out)  # type: ignore[arg-type]
    client = QuicConnection(configuration=QuicConfiguration(
        is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE))
    now = time.monotonic()
    client.connect(SERVER, now)
    for _ in range(6):  # handshake
        for data, _ in client.datagrams_to_send(now):
            ep.receive(data, CLIENT, forwarded=False)
        ep.flush()
        for data in out.datagrams:
            client.receive_datagram(data, SERVER, now)
        out.datagrams.clear()
    client.send_stream_data(0, b"")
    return client, ep, out, apps


def _inbound(config: Any, batch: int, rounds: int) -> float:
    client, ep, out, apps = _pair(config)
    payload = PUBLISH * batch
    spent = 0.0
    for _ in range(rounds):
        now = time.monotonic()
        client.send_stream_data(0, payload)
        datagrams = client.datagrams_to_send(now)
        t0 = time.process_time()
        for data, _ in datagrams:
            ep.receive(data, CLIENT, forwarded=False)
        ep.flush()
        spent += time.process_time() - t0
        for data in out.datagrams:  # the server's ACKs
            client.receive_datagram(data, SERVER, now)
        out.datagrams.clear()
    assert apps[0].proto.bytes == len(payload) * rounds
    ep.loop.close()
    return spent / (batch * rounds)


def _outbound(config: Any, batch: int, rounds: int) -> float:
    client, ep, out, apps = _pair(config)
    client.send_stream_data(0, PUBLISH)  # opens the control stream on the server
    for data, _ in client.datagrams_to_send(time.monotonic()):
        ep.receive(data, CLIENT, forwarded=False)
    stream = apps[0].proto.transport
    payload = PUBLISH * batch
    spent = 0.0
    received = 0
    for _ in range(rounds):
        now = time.monotonic()
        t0 = time.process_time()
        stream.write(payload)
        ep.flush()
        spent += time.process_time() - t0
        for data in out.datagrams:
            client.receive_datagram(data, SERVER, now)
        out.datagrams.clear()
        ev = client.next_event()
        while ev is not None:
            received += len(getattr(ev, "data", b""))
            ev = client.next_event()
        acks = client.datagrams_to_send(now)
        t0 = time.process_time()
        for data, _ in acks:
            ep.receive(data, CLIENT, forwarded=False)
        spent += time.process_time() - t0
    ep.loop.close()
    return spent / (batch * rounds)


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        cert, key = ensure_self_signed(d)
        config = server_configuration(cert, key, 60.0)
        print("server CPU per 66-byte PUBLISH through QUIC (aioquic 1.7.2)")
        for batch, rounds in ((1, 3000), (50, 300)):
            inbound = _inbound(config, batch, rounds)
            outbound = _outbound(config, batch, rounds)
            print(f"  batch {batch:3d}: inbound {inbound * 1e6:7.2f} us/msg   "
                  f"outbound {outbound * 1e6:7.2f} us/msg")


if __name__ == "__main__":
    main()
