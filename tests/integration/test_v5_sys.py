"""`$SYS` statistics: published periodically under `$SYS/broker/`, seen by explicit
`$SYS` subscribers only, never by wildcard subscribers."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.integration.v5client import Msg, Pool, V5Client, clients

pytestmark = pytest.mark.integration
__all__ = ["clients"]

WANTED = {"$SYS/broker/clients/connected", "$SYS/broker/messages/received", "$SYS/broker/uptime"}


def _until(sub: V5Client, done: Any, timeout: float) -> list[Msg]:
    """Messages until ``done(messages)`` holds; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    got: list[Msg] = []
    while not done(got):
        left = deadline - time.monotonic()
        assert left > 0, f"gave up after {timeout}s with {sorted({m.topic for m in got})}"
        got.append(sub.get(left))
    return got


def _number(payload: bytes) -> float:
    return float(payload.decode().split()[0])    # "12" or "12 seconds"


@pytest.mark.shoal_only
def test_v5_sys_topics_published_periodically(make_broker: Any, clients: Pool, uid: str) -> None:
    b = make_broker({"mqtt": {"sys_interval": 0.5}})
    wild = clients.v5(b, f"{uid}-w")
    assert wild.subscribe(("#", 0), ("+/broker/#", 0), ("+/+/+", 0), ("$share/g/#", 0)) == [0, 0, 0, 0]
    sys_ = clients.v5(b, f"{uid}-s")
    assert sys_.subscribe(("$SYS/broker/#", 0)) == [0]
    pub = clients.v5(b, f"{uid}-p")
    for i in range(3):
        pub.publish(f"{uid}/n{i}", b"x", qos=1)

    # every wanted topic, and uptime twice: it is periodic, not a one-off on subscribe
    got = _until(sys_, lambda ms: WANTED <= {m.topic for m in ms}
                 and sum(m.topic == "$SYS/broker/uptime" for m in ms) >= 2, 4.0)
    assert all(m.topic.startswith("$SYS/broker/") for m in got)
    last = {m.topic: m.payload for m in got}
    assert _number(last["$SYS/broker/clients/connected"]) >= 3
    assert _number(last["$SYS/broker/messages/received"]) >= 3
    assert _number(last["$SYS/broker/uptime"]) >= 0

    # the wildcard subscriber (shared wildcard too) saw its plain messages and no `$`
    # topic at all, though $SYS traffic flowed all along
    seen = wild.drain()
    plain = sorted({m.topic for m in seen if not m.topic.startswith("$")})
    assert plain == [f"{uid}/n{i}" for i in range(3)]
    assert not [m.topic for m in seen if m.topic.startswith("$")]


@pytest.mark.shoal_only
def test_v5_sys_counters_move(make_broker: Any, clients: Pool, uid: str) -> None:
    b = make_broker({"mqtt": {"sys_interval": 0.5}})
    sys_ = clients.v5(b, f"{uid}-s")
    assert sys_.subscribe(("$SYS/broker/messages/received", 0)) == [0]
    first = _number(sys_.get(3.0).payload)
    pub = clients.v5(b, f"{uid}-p")
    for i in range(5):
        pub.publish(f"{uid}/x", b"x", qos=1)
    later = _until(sys_, lambda ms: bool(ms) and _number(ms[-1].payload) >= first + 5, 4.0)
    assert all(m.topic == "$SYS/broker/messages/received" for m in later)


def test_v5_clients_cannot_publish_to_sys(broker: Any, clients: Pool, uid: str) -> None:
    """`$SYS` belongs to the broker: a client's publish there must not reach `$SYS`
    subscribers (refused with an error PUBACK, as Mosquitto does, or dropped)."""
    sys_ = clients.v5(broker, f"{uid}-s")
    assert sys_.subscribe((f"$SYS/{uid}/#", 1)) == [1]
    pub = clients.v5(broker, f"{uid}-p")
    rc = pub.publish(f"$SYS/{uid}/fake", b"forged", qos=1)
    assert rc is not None
    sys_.expect_no_message()
