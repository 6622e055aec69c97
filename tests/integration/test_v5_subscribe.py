"""MQTT 5 SUBSCRIBE features: subscription identifiers, No Local, per-filter SUBACK
reason codes, subscription quota, and `$` topics versus wildcards."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.v5client import (PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, QUIET, Pool,
                                        SubscribeOptions, clients)

pytestmark = pytest.mark.integration
__all__ = ["clients"]


# --------------------------------------------------------------------------- subscription identifiers

def test_v5_subscription_identifiers_on_overlapping_filters(broker: Any, clients: Pool, uid: str) -> None:
    sub = clients.v5(broker, f"{uid}-s")
    assert sub.subscribe((f"{uid}/+/x", 1), sub_id=7) == [1]
    assert sub.subscribe((f"{uid}/#", 1), sub_id=9) == [1]
    assert sub.subscribe((f"{uid}/plain/y", 1)) == [1]           # no identifier
    pub = clients.v5(broker, f"{uid}-p")

    # matches 7 and 9: one copy carrying both, or one copy per subscription (3.3.4)
    pub.publish(f"{uid}/a/x", b"both", qos=1)
    pub.publish(f"{uid}/a/y", b"nine", qos=1)                   # a marker after it
    msgs = []
    while not msgs or msgs[-1].payload != b"nine":
        msgs.append(sub.get())
    both, nine = msgs[:-1], msgs[-1]
    ids = sorted(sorted(m.props.get("SubscriptionIdentifier", [])) for m in both)
    assert ids in ([[7, 9]], [[7], [9]]), [(m.payload, m.props) for m in both]
    assert all(m.payload == b"both" for m in both)

    assert nine.props.get("SubscriptionIdentifier") == [9]

    # matches 9 and the id-less filter: the copy for the id-less one carries none
    pub.publish(f"{uid}/plain/y", b"mixed", qos=1)
    pub.publish(f"{uid}/end", b"end", qos=1)
    msgs = []
    while not msgs or msgs[-1].payload != b"end":
        msgs.append(sub.get())
    mixed = msgs[:-1]
    assert msgs[-1].props.get("SubscriptionIdentifier") == [9]
    ids = sorted(sorted(m.props.get("SubscriptionIdentifier", [])) for m in mixed)
    # a single copy carries the ids of all matching subscriptions that have one
    assert ids in ([[9]], [[], [9]]), [(m.payload, m.props) for m in mixed]


def test_v5_subscription_identifier_replaced_on_resubscribe(broker: Any, clients: Pool, uid: str) -> None:
    sub = clients.v5(broker, f"{uid}-s")
    topic = f"{uid}/resub"
    assert sub.subscribe((topic, 1), sub_id=3) == [1]
    pub = clients.v5(broker, f"{uid}-p")
    pub.publish(topic, b"a", qos=1)
    assert sub.get().props.get("SubscriptionIdentifier") == [3]
    assert sub.subscribe((topic, 1), sub_id=268435455) == [1]   # largest allowed
    pub.publish(topic, b"b", qos=1)
    assert sub.get().props.get("SubscriptionIdentifier") == [268435455]
    assert sub.subscribe((topic, 1)) == [1]                     # and dropped again
    pub.publish(topic, b"c", qos=1)
    assert "SubscriptionIdentifier" not in sub.get().props


def test_v5_subscription_identifier_zero_is_a_protocol_error(broker: Any, clients: Pool, uid: str) -> None:
    raw = clients.raw(broker)
    raw.connect(f"{uid}-s")
    kind, codes = raw.suback_or_disconnect(1, [(f"{uid}/t", 1)], bytes([11, 0]))   # id 0
    assert kind == "disconnect" and codes[0] in (0x81, 0x82), (kind, codes)


def test_v5_retained_message_carries_subscription_identifier(broker: Any, clients: Pool, uid: str) -> None:
    topic = f"{uid}/ret"
    pub = clients.v5(broker, f"{uid}-p")
    pub.publish(topic, b"kept", qos=1, retain=True)
    sub = clients.v5(broker, f"{uid}-s")
    assert sub.subscribe((f"{uid}/#", 1), sub_id=42) == [1]
    m = sub.get()
    assert (m.payload, m.retain, m.props.get("SubscriptionIdentifier")) == (b"kept", True, [42])
    pub.publish(topic, b"", qos=1, retain=True)


# --------------------------------------------------------------------------- no local

def test_v5_no_local(broker: Any, clients: Pool, uid: str) -> None:
    topic = f"{uid}/nl"
    me = clients.v5(broker, f"{uid}-me")
    assert me.subscribe((topic, SubscribeOptions(qos=1, noLocal=True))) == [1]
    watcher = clients.v5(broker, f"{uid}-w")                      # control: sees everything
    assert watcher.subscribe((topic, 1)) == [1]
    other = clients.v5(broker, f"{uid}-other")

    assert me.publish(topic, b"mine", qos=1) == 0
    assert other.publish(topic, b"theirs", qos=1) == 0
    assert [m.payload for m in watcher.collect(2)] == [b"mine", b"theirs"]
    assert me.get().payload == b"theirs"
    me.expect_no_message()


def test_v5_no_local_off_receives_own_messages(broker: Any, clients: Pool, uid: str) -> None:
    topic = f"{uid}/nl"
    me = clients.v5(broker, f"{uid}-me")
    assert me.subscribe((topic, SubscribeOptions(qos=1, noLocal=False))) == [1]
    me.publish(topic, b"mine", qos=1)
    assert me.get().payload == b"mine"


# --------------------------------------------------------------------------- SUBACK reason codes

@pytest.mark.shoal_only
def test_v5_invalid_filter_refused_alone(broker: Any, clients: Pool, uid: str) -> None:
    """A filter with a misplaced wildcard gets 0x8F in its own SUBACK slot; the other
    filters of the same SUBSCRIBE are granted and work. (Mosquitto 2.0 treats the whole
    packet as malformed and disconnects, hence shoal_only. Raw socket: paho refuses to
    send such filters.)"""
    raw = clients.raw(broker)
    raw.connect(f"{uid}-s")
    suback = raw.subscribe(1, [(f"{uid}/ok/a", 1), (f"{uid}/bad/#/x", 1), (f"{uid}/plus/+", 0),
                               (f"{uid}/bad+", 1), (f"{uid}/hash/#", 2), (f"{uid}/#/", 0)])
    assert suback.reasons == [1, 0x8F, 0, 0x8F, 2, 0x8F], [hex(c) for c in suback.reasons]
    pub = clients.v5(broker, f"{uid}-p")
    for topic in (f"{uid}/ok/a", f"{uid}/plus/z", f"{uid}/hash/z/y"):
        pub.publish(topic, b"x", qos=2)
    got = []
    for _ in range(3):
        p = raw.expect(PUBLISH)
        got.append((p.topic, p.qos))
        if p.qos == 1:
            raw.ack(PUBACK, p.pid)
        elif p.qos == 2:
            raw.ack(PUBREC, p.pid)
            raw.expect(PUBREL)
            raw.ack(PUBCOMP, p.pid)
    # each granted filter works, at its granted QoS
    assert got == [(f"{uid}/ok/a", 1), (f"{uid}/plus/z", 0), (f"{uid}/hash/z/y", 2)]
    try:
        extra = raw.recv(QUIET)
    except TimeoutError:
        extra = None
    assert extra is None or extra.type != PUBLISH, extra


@pytest.mark.shoal_only
def test_v5_subscription_quota(make_broker: Any, clients: Pool, uid: str) -> None:
    b = make_broker({"mqtt": {"max_subscriptions_per_client": 2}})
    sub = clients.v5(b, f"{uid}-s")
    assert sub.subscribe((f"{uid}/a", 1), (f"{uid}/b", 1)) == [1, 1]
    assert sub.subscribe((f"{uid}/c", 1)) == [0x97]
    assert sub.subscribe((f"{uid}/a", 2)) == [2], "replacing an existing subscription is not a new one"
    assert sub.unsubscribe(f"{uid}/b") == [0]
    assert sub.subscribe((f"{uid}/c", 1)) == [1]
    pub = clients.v5(b, f"{uid}-p")
    for t in ("a", "b", "c"):
        pub.publish(f"{uid}/{t}", t.encode(), qos=1)
    assert sorted(m.payload for m in sub.collect(2)) == [b"a", b"c"]
    sub.expect_no_message()


# --------------------------------------------------------------------------- $ topics

def test_v5_wildcards_do_not_match_dollar_topics(broker: Any, clients: Pool, uid: str) -> None:
    """4.7.2: a filter starting with a wildcard never matches a topic starting with `$`.
    `$SYS` is the broker's; clients may publish to other `$` topics, though the server
    SHOULD keep them from reaching other clients, so only the wildcard side is asserted
    for `$test`. Mosquitto's retained $SYS statistics make the `$SYS/#` side real."""
    wild = clients.v5(broker, f"{uid}-w")
    assert wild.subscribe(("#", 0), ("+/x", 0), ("+/broker/#", 0), ("+/+/+", 0)) == [0, 0, 0, 0]
    dollar = clients.v5(broker, f"{uid}-d")
    assert dollar.subscribe(("$SYS/#", 0), (f"$test{uid}/#", 0)) == [0, 0]
    pub = clients.v5(broker, f"{uid}-p")
    pub.publish(f"$test{uid}/x", b"dollar", qos=1)
    pub.publish(f"{uid}/x", b"plain", qos=1)          # matches every filter of `wild`
    seen = wild.drain()
    assert [m for m in seen if m.topic == f"{uid}/x"], "control message did not arrive"
    assert not [m.topic for m in seen if m.topic.startswith("$")]
    # `$` traffic did flow (shoal forwards `$test...`, Mosquitto has retained $SYS
    # statistics), so the wildcard subscriber had something to wrongly match
    got = dollar.drain(0.1)
    assert got and all(m.topic.startswith("$") for m in got), [m.topic for m in got]
