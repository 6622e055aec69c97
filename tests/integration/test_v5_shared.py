"""MQTT 5 shared subscriptions (`$share/group/filter`), the legacy `$queue/filter`
form, and the configurable distribution strategy."""

from __future__ import annotations

import queue
import time
from collections import Counter
from typing import Any

import pytest

from tests.integration.v5client import QUIET, TIMEOUT, Pool, V5Client, clients

pytestmark = pytest.mark.integration
__all__ = ["clients"]

N = 20


def _members(clients: Pool, broker: Any, uid: str, filter_: str, n: int, tag: str,
             qos: int = 1) -> list[V5Client]:
    out = []
    for i in range(n):
        c = clients.v5(broker, f"{uid}-{tag}{i}")
        assert c.subscribe((filter_, qos)) == [qos]
        out.append(c)
    return out


def _split(members: list[V5Client], n: int, timeout: float = TIMEOUT) -> list[list[bytes]]:
    """Payloads each member got, once ``n`` arrived between them and then nothing more
    for QUIET seconds. Fails if fewer than ``n`` arrive in time."""
    got: list[list[bytes]] = [[] for _ in members]
    deadline = time.monotonic() + timeout
    while sum(map(len, got)) < n:
        assert time.monotonic() < deadline, f"only {sum(map(len, got))} of {n} arrived: {got}"
        for i, m in enumerate(members):
            try:
                got[i].append(m.messages.get(timeout=0.02).payload)
            except queue.Empty:
                pass
    for i, m in enumerate(members):
        got[i] += [x.payload for x in m.drain(QUIET if i == 0 else 0.05)]
    return got


def _publish(clients: Pool, broker: Any, uid: str, topic: str, n: int = N) -> list[bytes]:
    pub = clients.v5(broker, f"{uid}-pub")
    sent = [f"m{i}".encode() for i in range(n)]
    for p in sent:
        assert pub.publish(topic, p, qos=1) == 0
    return sent


def _assert_each_once(got: list[list[bytes]], sent: list[bytes]) -> None:
    flat = [p for member in got for p in member]
    dupes = [p for p, k in Counter(flat).items() if k > 1]
    assert not dupes, f"delivered to more than one member: {dupes}"
    assert sorted(flat) == sorted(sent), f"lost: {set(sent) - set(flat)}"
    for member in got:   # each member sees its share in publish order
        assert member == sorted(member, key=sent.index)


def test_v5_shared_subscription_splits_messages(broker: Any, clients: Pool, uid: str) -> None:
    topic = f"{uid}/work"
    members = _members(clients, broker, uid, f"$share/g/{topic}", 2, "m")
    normal = clients.v5(broker, f"{uid}-normal")
    assert normal.subscribe((topic, 1)) == [1]
    sent = _publish(clients, broker, uid, topic)

    got = _split(members, N)
    _assert_each_once(got, sent)
    assert all(got), f"one member got nothing: {[len(g) for g in got]}"
    # a non-shared subscription alongside is unaffected
    assert [m.payload for m in normal.collect(N)] == sent
    normal.expect_no_message(0.1)


def test_v5_shared_groups_are_independent(broker: Any, clients: Pool, uid: str) -> None:
    topic = f"{uid}/work"
    g1 = _members(clients, broker, uid, f"$share/one/{topic}", 2, "a")
    g2 = _members(clients, broker, uid, f"$share/two/{topic}", 2, "b")
    solo = _members(clients, broker, uid, f"$share/three/{uid}/+", 1, "c")   # other filter
    sent = _publish(clients, broker, uid, topic)
    _assert_each_once(_split(g1, N), sent)
    _assert_each_once(_split(g2, N), sent)
    _assert_each_once(_split(solo, N), sent)


def test_v5_shared_message_topic_is_the_published_topic(broker: Any, clients: Pool, uid: str) -> None:
    member = clients.v5(broker, f"{uid}-m")
    assert member.subscribe((f"$share/g/{uid}/+/x", 1), sub_id=5) == [1]
    pub = clients.v5(broker, f"{uid}-p")
    pub.publish(f"{uid}/a/x", b"1", qos=1)
    m = member.get()
    assert (m.topic, m.payload, m.qos) == (f"{uid}/a/x", b"1", 1)
    assert m.props.get("SubscriptionIdentifier") == [5]


def test_v5_shared_subscription_survives_member_leaving(broker: Any, clients: Pool, uid: str) -> None:
    topic = f"{uid}/work"
    a, b = _members(clients, broker, uid, f"$share/g/{topic}", 2, "m")
    assert a.unsubscribe(f"$share/g/{topic}") == [0]
    sent = _publish(clients, broker, uid, topic, 10)
    assert [m.payload for m in b.collect(10)] == sent
    a.expect_no_message(0.1)
    b.close()
    c = clients.v5(broker, f"{uid}-late")
    assert c.subscribe((f"$share/g/{topic}", 1)) == [1]
    pub = clients.v5(broker, f"{uid}-pub2")
    pub.publish(topic, b"after", qos=1)
    assert c.get().payload == b"after"


# Mosquitto 2.0.11 grants the last three as if they were ordinary filters: shoal_only
LAX = pytest.mark.shoal_only


@pytest.mark.parametrize("bad", ["$share/g+/{uid}", "$share/g#/{uid}",
                                 pytest.param("$share/{uid}", marks=LAX),     # no "/" + filter
                                 pytest.param("$share//{uid}", marks=LAX),    # empty ShareName
                                 pytest.param("$share/{uid}/", marks=LAX)])   # empty filter
def test_v5_shared_invalid_share_name_refused(broker: Any, clients: Pool, uid: str, bad: str) -> None:
    """4.8.2: the ShareName is at least one character, free of `/ + #`, and followed
    by `/` and a (non-empty, 4.7.3) Topic Filter. Refused per filter (SUBACK 0x8F) or
    as a malformed packet / protocol error (DISCONNECT 0x81 / 0x82)."""
    raw = clients.raw(broker)
    raw.connect(f"{uid}-s")
    kind, codes = raw.suback_or_disconnect(1, [(bad.format(uid=uid), 1)])
    assert (kind, codes) in [("suback", [0x8F]), ("disconnect", [0x81]), ("disconnect", [0x82])], \
        (kind, [hex(c) for c in codes])


@pytest.mark.shoal_only
def test_v5_no_local_on_shared_subscription_is_protocol_error(broker: Any, clients: Pool, uid: str) -> None:
    """MQTT-3.8.3-4: No Local on a Shared Subscription is a Protocol Error, so DISCONNECT
    0x82. (Mosquitto 2.0.11 grants it, hence shoal_only.)"""
    raw = clients.raw(broker)
    raw.connect(f"{uid}-s")
    raw.send_subscribe(1, [(f"$share/g/{uid}/t", 0x04 | 1)])
    d = raw.wait_disconnect()
    assert d is not None and d.reason == 0x82, f"expected DISCONNECT 0x82, got {d}"


@pytest.mark.shoal_only
def test_v5_new_shared_subscription_gets_no_retained_message(broker: Any, clients: Pool,
                                                              uid: str) -> None:
    """Retained messages go to a new *Non-shared* Subscription (3.3.1.3); a member
    joining a group must not get them. (Mosquitto 2.0.11 sends them: shoal_only.)"""
    topic = f"{uid}/state"
    pub = clients.v5(broker, f"{uid}-p")
    pub.publish(topic, b"retained", qos=1, retain=True)
    plain = clients.v5(broker, f"{uid}-plain")
    assert plain.subscribe((topic, 1)) == [1]
    assert plain.get().payload == b"retained"          # it is there to be sent
    [member] = _members(clients, broker, uid, f"$share/g/{topic}", 1, "m")
    member.expect_no_message()
    pub.publish(topic, b"live", qos=1)                  # live messages do reach the group
    assert member.get().payload == b"live"
    pub.publish(topic, b"", qos=1, retain=True)


@pytest.mark.shoal_only
def test_v5_legacy_queue_prefix_is_one_group(broker: Any, clients: Pool, uid: str) -> None:
    topic = f"{uid}/jobs"
    members = _members(clients, broker, uid, f"$queue/{topic}", 2, "q")
    sent = _publish(clients, broker, uid, topic)
    got = _split(members, N)
    _assert_each_once(got, sent)
    assert all(got), [len(g) for g in got]
    # deliveries name the real topic, not the `$queue/` filter
    members[0].publish(topic, b"one more", qos=1)
    msgs = [m for c in members for m in c.drain()]
    assert [(m.topic, m.payload) for m in msgs] == [(topic, b"one more")]


@pytest.mark.shoal_only
def test_v5_shared_round_robin_balances(make_broker: Any, clients: Pool, uid: str) -> None:
    b = make_broker({"mqtt": {"shared_subscription_strategy": "round_robin"}})
    topic = f"{uid}/rr"
    members = _members(clients, b, uid, f"$share/g/{topic}", 2, "m")
    sent = _publish(clients, b, uid, topic)
    got = _split(members, N)
    _assert_each_once(got, sent)
    assert [len(g) for g in got] == [N // 2, N // 2], [len(g) for g in got]


@pytest.mark.shoal_only
def test_v5_shared_random_strategy_delivers_each_once(make_broker: Any, clients: Pool, uid: str) -> None:
    b = make_broker({"mqtt": {"shared_subscription_strategy": "random"}})
    topic = f"{uid}/rnd"
    members = _members(clients, b, uid, f"$share/g/{topic}", 3, "m")
    sent = _publish(clients, b, uid, topic, 30)
    got = _split(members, 30)
    _assert_each_once(got, sent)
    assert sum(1 for g in got if g) >= 2, [len(g) for g in got]   # P(all to one) = 3^-29
