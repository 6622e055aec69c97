"""Connection limits and per-client rates, against a real broker over real sockets."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.harness import Broker
from tests.integration.rawclient import (
    CONNACK,
    RawClient,
    RawEOF,
    connect,
    publish,
)

pytestmark = [pytest.mark.integration, pytest.mark.shoal_only]

MakeBroker = Callable[[dict[str, Any] | None], Broker]


def _refused(b: Broker, client_id: str) -> bool:
    """Open a connection and send CONNECT: True if the broker closes it without a CONNACK."""
    with RawClient(b.host, b.port, timeout=5.0) as c:
        if not c.try_send(connect(client_id)):
            return True
        try:
            p = c.read()
        except (ConnectionResetError, RawEOF):
            return True
        return p is None  # EOF, nothing sent


def _connects_within(b: Broker, client_id: str, seconds: float) -> RawClient:
    """A connection that gets its CONNACK, retrying while a closed slot is released."""
    deadline = time.monotonic() + seconds
    while True:
        c = RawClient(b.host, b.port)
        if c.try_send(connect(client_id)):
            p = c.read()
            if p is not None and p.type == CONNACK:
                return c
        c.close()
        assert time.monotonic() < deadline, f"{client_id} never got a CONNACK"
        time.sleep(0.05)  # polling for the broker to notice a close, with a deadline


@pytest.mark.parametrize("where", ["host", "listener"])
def test_connection_over_the_limit_is_closed(make_broker: MakeBroker, uid: str, where: str) -> None:
    cfg = ({"limits": {"max_connections": 3}} if where == "host"
           else {"listeners": {"tcp": {"max_connections": 3}}})
    b = make_broker(cfg)
    clients = [RawClient(b.host, b.port) for _ in range(3)]
    try:
        for i, c in enumerate(clients):
            c.connect(f"{uid}-{i}")
        assert _refused(b, f"{uid}-extra")
        assert _refused(b, f"{uid}-extra2")
        clients[0].ping()  # the admitted ones are unaffected
        clients[2].ping()
        clients[1].close()  # a slot frees up: a newcomer gets in again
        clients[1] = _connects_within(b, f"{uid}-late", 5.0)
        clients[1].ping()
    finally:
        for c in clients:
            c.close()
    assert "refuses connections" in b.log()


def test_connection_rate_closes_a_burst(make_broker: MakeBroker, uid: str) -> None:
    b = make_broker({"listeners": {"tcp": {"max_connection_rate": 5.0}}})
    socks = []
    start = time.monotonic()
    for _ in range(40):
        socks.append(socket.create_connection((b.host, b.port), timeout=5.0))
    elapsed = time.monotonic() - start
    accepted = refused = 0
    for i, s in enumerate(socks):
        try:
            s.sendall(connect(f"{uid}-{i}"))
            data = s.recv(4)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if data[:1] == b"\x20":
            accepted += 1
        else:
            refused += 1
        s.close()
    # a burst of 5, refilling at 5/s over the time the 40 connects took (well under 1 s here)
    allowed = 5 + 5 * (elapsed + 1.0)
    assert 5 <= accepted <= allowed, (accepted, refused, elapsed)
    assert refused >= 40 - allowed
    # one log line for the storm, not one per connection
    assert 1 <= b.log().count("refuses connections") <= 2
    c = _connects_within(b, f"{uid}-after", 5.0)  # the bucket refills
    c.close()


def _count_until(sub: RawClient, topic: str, until: float, counts: dict[str, int]) -> None:
    while time.monotonic() < until:
        try:
            p = sub.read(max(0.01, until - time.monotonic()))
        except AssertionError:  # RawTimeout
            return
        if p is None:
            return
        if p.type == 3:
            name_len = int.from_bytes(p.body[:2], "big")
            t = p.body[2:2 + name_len].decode()
            counts[t] = counts.get(t, 0) + 1


def test_message_rate_throttles_one_client_not_the_others(make_broker: MakeBroker, uid: str) -> None:
    rate = 50
    b = make_broker({"limits": {"message_rate": float(rate)}})
    fast_t, calm_t = f"{uid}/fast", f"{uid}/calm"
    with RawClient(b.host, b.port) as sub, RawClient(b.host, b.port) as fast, \
            RawClient(b.host, b.port) as calm:
        sub.connect(f"{uid}-sub")
        sub.subscribe(f"{uid}/#")
        fast.connect(f"{uid}-fast")
        calm.connect(f"{uid}-calm")
        # 2,000 QoS 0 publishes in one go: 40 s worth at the rate
        fast.send(b"".join(publish(fast_t, b"x" * 10) for _ in range(2000)))
        start = time.monotonic()
        calm.send(b"".join(publish(calm_t, b"y") for _ in range(20)))
        counts: dict[str, int] = {}
        window = 3.0
        _count_until(sub, fast_t, start + window, counts)
    got_fast = counts.get(fast_t, 0)
    print(f"throttled publisher: {got_fast} messages in {window}s at rate {rate}/s (expected ~{rate + rate * window:.0f})")
    # burst (rate) + rate x window, with generous margins either way
    expected = rate + rate * window
    assert 0.5 * expected <= got_fast <= 1.5 * expected, (got_fast, expected)
    assert counts.get(calm_t, 0) == 20, counts  # the other client is not slowed
    assert "throttling" in b.log()


def test_byte_rate_bounds_what_a_client_gets_through(make_broker: MakeBroker, uid: str) -> None:
    rate = 200_000  # bytes a second
    b = make_broker({"limits": {"byte_rate": float(rate)}})
    topic = f"{uid}/bytes"
    one = publish(topic, b"z" * 1000)
    with RawClient(b.host, b.port) as sub, RawClient(b.host, b.port) as fast:
        sub.connect(f"{uid}-sub")
        sub.subscribe(topic)
        fast.connect(f"{uid}-fast")
        fast.sock.setblocking(False)
        pending = memoryview(one * 4000)  # ~4 MB: 20 s worth at the rate
        start = time.monotonic()
        window = 3.0
        counts: dict[str, int] = {}
        while time.monotonic() < start + window:
            if pending:
                try:
                    pending = pending[fast.sock.send(pending[:65536]):]
                except BlockingIOError:
                    pass  # the broker stopped reading us: that is the point
            _count_until(sub, topic, min(start + window, time.monotonic() + 0.02), counts)
    got = counts.get(topic, 0) * len(one)
    expected = rate + rate * window
    print(f"byte-throttled publisher: {got} bytes in {window}s at {rate} B/s (expected ~{expected:.0f})")
    # a read is charged after it arrives, so the first read and the one in flight at the
    # window's end (each <= 256 kB, the loops' read size) may overshoot
    assert 0.5 * expected <= got <= expected + 2 * 262144, (got, expected)
