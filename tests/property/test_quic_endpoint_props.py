"""Any datagram, however mangled, is dropped or answered: it never raises out of the endpoint.

The endpoint is driven without sockets: datagrams go in through ``receive`` and whatever it
sends is collected, on a loop that never runs (the endpoint only asks it for the time and to
schedule its flush, which the test calls itself). Mutations start from a real client Initial,
so the header parser, the Retry path and aioquic's packet handling all see near-valid input.
"""

from __future__ import annotations

import asyncio
import ssl
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from listeners.quic import (
    ALPN, ConnectionApp, Endpoint, QuicStream, ServerConnection, ensure_self_signed,
    server_configuration, tagged_cid,
)

ADDR = ("10.1.2.3", 5555)


class _Sink(asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        pass


class _App(ConnectionApp):
    def control_stream(self, stream: QuicStream) -> asyncio.Protocol:
        return _Sink()

    def data_stream(self, stream: QuicStream) -> asyncio.Protocol | None:
        return _Sink()


class _Transport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("10.9.9.9", 14567) if name == "sockname" else default


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[Any, bytes]]:
    with tempfile.TemporaryDirectory() as d:
        cert, key = ensure_self_signed(d)
        config = server_configuration(cert, key, 60.0)
        client = QuicConnection(configuration=QuicConfiguration(
            is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE))
        client.connect(("10.9.9.9", 14567), 0.0)
        initial = client.datagrams_to_send(0.0)[0][0]
        yield config, initial


def _endpoint(config: Any, retry: bool, forward: bool) -> tuple[Endpoint, _Transport, list[Any]]:
    loop = asyncio.new_event_loop()
    forwarded: list[Any] = []
    ep = Endpoint(loop, config, lambda conn: _App(), index=1, count=3, retry=retry,
                  forward=(lambda owner, blob: forwarded.append(owner)) if forward else None)
    t = _Transport()
    ep.connection_made(t)  # type: ignore[arg-type]
    return ep, t, forwarded


def _flip(data: bytes, positions: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in positions:
        if out:
            out[pos % len(out)] = value
    return bytes(out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 1300), flips=st.lists(st.tuples(st.integers(0, 1300), st.integers(0, 255)), max_size=6),
       retry=st.booleans())
def test_mangled_initials_never_raise(setup: tuple[Any, bytes], cut: int,
                                      flips: list[tuple[int, int]], retry: bool) -> None:
    config, initial = setup
    ep, t, _ = _endpoint(config, retry, forward=True)
    try:
        ep.receive(_flip(initial[:cut] if cut else initial, flips), ADDR, forwarded=False)
        ep.flush()
    finally:
        ep.loop.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=1400))
def test_random_datagrams_never_raise(setup: tuple[Any, bytes], data: bytes) -> None:
    config, _ = setup
    ep, _, _ = _endpoint(config, retry=False, forward=True)
    try:
        ep.receive(data, ADDR, forwarded=False)
        ep.receive(data, ADDR, forwarded=True)
        ep.flush()
    finally:
        ep.loop.close()


def test_a_real_initial_makes_one_connection_and_an_answer(setup: tuple[Any, bytes]) -> None:
    config, initial = setup
    ep, t, _ = _endpoint(config, retry=False, forward=False)
    try:
        ep.receive(initial, ADDR, forwarded=False)
        ep.flush()
        assert len(ep.live) == 1 and t.sent and all(addr == ADDR for _, addr in t.sent)
        conn = next(iter(ep.live))
        assert isinstance(conn, ServerConnection) and conn.quic.host_cid[0] % 3 == 1
    finally:
        ep.loop.close()


def test_short_header_for_another_shard_is_forwarded_once(setup: tuple[Any, bytes]) -> None:
    config, _ = setup
    ep, _, forwarded = _endpoint(config, retry=False, forward=True)
    try:
        datagram = b"\x40" + tagged_cid(2, 3) + b"\x00" * 30
        ep.receive(datagram, ADDR, forwarded=False)
        assert forwarded == [2]
        ep.receive(datagram, ADDR, forwarded=True)  # a forwarded one is never sent on again
        assert forwarded == [2] and ep.dropped == 1
    finally:
        ep.loop.close()


def test_connection_state_is_bounded(setup: tuple[Any, bytes]) -> None:
    config, initial = setup
    ep, _, _ = _endpoint(config, retry=False, forward=False)
    ep.max_live = 3
    try:
        for i in range(5):
            # a flood of fresh Initials from one address, each with its own client id
            client = QuicConnection(configuration=QuicConfiguration(
                is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE))
            client.connect(("10.9.9.9", 14567), 0.0)
            ep.receive(client.datagrams_to_send(0.0)[0][0], (ADDR[0], 6000 + i), forwarded=False)
        assert len(ep.live) == 3 and ep.dropped == 2
    finally:
        ep.loop.close()
