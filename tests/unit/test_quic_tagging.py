"""Guards the aioquic subclass that tags connection ids, and the steering program.

listeners/quic.py reaches into aioquic's private attributes (``_host_cids``,
``_local_initial_source_connection_id``, ``_replenish_connection_ids``) because aioquic has no
hook for choosing connection ids. These tests run a whole handshake in memory (datagrams
passed by hand, no sockets, time passed in) and check that every id the server ever hands the
client routes back to the server's shard. If a new aioquic moves those attributes, this fails
before a deployment silently loses migrating clients.
"""

from __future__ import annotations

import importlib.metadata
import ssl
from pathlib import Path

import pytest
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from listeners.quic import (
    ALPN, CID_LENGTH, TaggedQuicConnection, ensure_self_signed, owner_of, server_configuration,
    steering_program, tagged_cid,
)

CLIENT_ADDR = ("10.0.0.1", 40000)
SERVER_ADDR = ("10.0.0.2", 14567)


def test_aioquic_is_the_pinned_version() -> None:
    # the pin in setup.cfg and this guard move together
    assert importlib.metadata.version("aioquic") == "1.7.2"


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 16, 255])
def test_tagged_ids_belong_to_their_shard(count: int) -> None:
    for index in range(count):
        for _ in range(50):
            cid = tagged_cid(index, count)
            assert len(cid) == CID_LENGTH and owner_of(cid, count) == index


def _pump(a: QuicConnection, a_addr: tuple[str, int], b: QuicConnection, now: float) -> int:
    n = 0
    for data, _ in a.datagrams_to_send(now):
        b.receive_datagram(data, a_addr, now)
        n += 1
    return n


def _handshake(tmp_path: Path, index: int, count: int) -> tuple[QuicConnection, TaggedQuicConnection, list[bytes]]:
    cert, key = ensure_self_signed(str(tmp_path))
    server_cfg = server_configuration(cert, key, 60.0)
    client_cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN],
                                   verify_mode=ssl.CERT_NONE)
    client = QuicConnection(configuration=client_cfg)
    now = 1.0
    client.connect(SERVER_ADDR, now)
    first = client.datagrams_to_send(now)
    server = TaggedQuicConnection(index=index, count=count, configuration=server_cfg,
                                  original_destination_connection_id=client.original_destination_connection_id)
    for data, _ in first:
        server.receive_datagram(data, CLIENT_ADDR, now)
    issued = [server.host_cid]
    for _ in range(10):
        now += 0.01
        moved = _pump(server, SERVER_ADDR, client, now) + _pump(client, CLIENT_ADDR, server, now)
        for conn in (server,):
            event = conn.next_event()
            while event is not None:
                if isinstance(event, events.ConnectionIdIssued):
                    issued.append(event.connection_id)
                event = conn.next_event()
        if not moved:
            break
    return client, server, issued


@pytest.mark.parametrize("index,count", [(0, 1), (1, 2), (3, 4), (2, 3)])
def test_every_issued_id_routes_to_the_issuing_shard(tmp_path: Path, index: int, count: int) -> None:
    client, server, issued = _handshake(tmp_path, index, count)
    assert server._handshake_complete
    # the initial id and every NEW_CONNECTION_ID the client received
    assert len(set(issued)) >= 2, "the server issued no NEW_CONNECTION_ID: the guard saw nothing"
    for cid in issued:
        assert owner_of(cid, count) == index, (cid.hex(), index, count)
    client_ids = [client._peer_cid.cid] + [c.cid for c in client._peer_cid_available]
    assert len(client_ids) >= 2
    for cid in client_ids:
        assert owner_of(cid, count) == index
    # a client switching to a fresh id (as MsQuic does after 20 s idle) still reaches us
    client.change_connection_id()
    assert owner_of(client._peer_cid.cid, count) == index
    # ids are replenished as the client retires them: still ours
    for _ in range(3):
        client.change_connection_id()
        now = 5.0
        _pump(client, CLIENT_ADDR, server, now)
        _pump(server, SERVER_ADDR, client, now)
    for c in server._host_cids:
        assert owner_of(c.cid, count) == index


def _run_cbpf(prog: list[tuple[int, int, int, int]], packet: bytes) -> int:
    """A tiny interpreter for the instructions steering_program uses."""
    a, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == 0x30:  # ldb [k]
            if k >= len(packet):
                return 0  # a load past the end ends the program with 0
            a = packet[k]
        elif code == 0x45:  # jset #k
            pc += jt if a & k else jf
        elif code == 0x05:  # ja
            pc += k
        elif code == 0x94:  # mod #k
            a %= k
        elif code == 0x16:  # ret a
            return a
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
        pc += 1


@pytest.mark.parametrize("count", [2, 3, 4, 8])
def test_steering_program_picks_the_owner(count: int) -> None:
    prog = steering_program(count)
    for index in range(count):
        cid = tagged_cid(index, count)
        short = bytes([0x40]) + cid + b"\x00" * 30
        long_ = bytes([0xC0]) + b"\x00\x00\x00\x01" + bytes([len(cid)]) + cid + b"\x00" * 30
        assert _run_cbpf(prog, short) == index
        assert _run_cbpf(prog, long_) == index
    assert _run_cbpf(prog, b"\x40") == 0  # truncated: socket 0, which drops it
