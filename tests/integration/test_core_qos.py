"""QoS 0/1/2 delivery, downgrade, overlapping subscriptions, ordering, in-flight windows."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.clients import V5, V311, Clients

pytestmark = pytest.mark.integration

VERSIONS = pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])


@pytest.fixture
def clients(broker: Any) -> Iterator[Clients]:
    with Clients(broker) as c:
        yield c


@VERSIONS
def test_qos_matrix_delivers_min_of_publish_and_subscription(clients: Clients, uid: str,
                                                             version: int) -> None:
    topic = f"{uid}/qos"
    subs = {}
    for sub_qos in (0, 1, 2):
        s = clients.connect(f"{uid}-s{sub_qos}", version=version)
        assert s.subscribe(topic, sub_qos) == [sub_qos]
        subs[sub_qos] = s
    pub = clients.connect(f"{uid}-p", version=version)
    for pub_qos in (0, 1, 2):
        # completes only once the broker acknowledged (PUBACK for 1, PUBREC/PUBREL/PUBCOMP for 2)
        assert pub.publish(topic, f"from-{pub_qos}", pub_qos) == 0
    for sub_qos, s in subs.items():
        # ordering is only guaranteed per topic and QoS (MQTT-4.6.0-6), so compare as sets
        got = sorted(s.get_n(3), key=lambda m: m.payload)
        assert [m.payload for m in got] == [b"from-0", b"from-1", b"from-2"], sub_qos
        assert [m.qos for m in got] == [min(p, sub_qos) for p in (0, 1, 2)], f"subscription QoS {sub_qos}"
        assert all(m.topic == topic and not m.retain and not m.dup for m in got)
        s.expect_none(0.2)  # exactly once each, QoS 2 included


@VERSIONS
def test_qos2_subscriber_gets_qos1_from_qos1_publisher(clients: Clients, uid: str, version: int) -> None:
    topic = f"{uid}/t"
    sub = clients.connect(f"{uid}-s", version=version)
    assert sub.subscribe(topic, 2) == [2]
    pub = clients.connect(f"{uid}-p", version=version)
    pub.publish(topic, b"one", 1)
    m = sub.get()
    assert (m.payload, m.qos) == (b"one", 1)


@VERSIONS
def test_publisher_and_subscriber_same_client(clients: Clients, uid: str, version: int) -> None:
    topic = f"{uid}/self"
    c = clients.connect(f"{uid}-c", version=version)
    assert c.subscribe(topic, 2) == [2]
    for q in (0, 1, 2):
        c.publish(topic, f"q{q}", q)
    assert sorted((m.payload, m.qos) for m in c.get_n(3)) == [(b"q0", 0), (b"q1", 1), (b"q2", 2)]


@VERSIONS
def test_overlapping_subscriptions_respect_max_qos(clients: Clients, uid: str, version: int) -> None:
    # MQTT-3.3.5-1 (3.1.1) / MQTT-3.3.4-2 (5.0): deliver respecting the maximum QoS of all matching
    # subscriptions; further copies (one per extra subscription, at that subscription's QoS) are allowed.
    sub = clients.connect(f"{uid}-s", version=version)
    assert sub.subscribe(f"{uid}/#", 0) == [0]
    assert sub.subscribe(f"{uid}/+/c", 2) == [2]
    pub = clients.connect(f"{uid}-p", version=version)
    pub.publish(f"{uid}/b/c", b"x", 2)
    got = [sub.get()]
    try:
        got.append(sub.get(0.5))
    except TimeoutError:
        pass
    sub.expect_none(0.2)
    assert all(m.payload == b"x" for m in got)
    assert max(m.qos for m in got) == 2, got
    if len(got) == 2:
        assert sorted(m.qos for m in got) == [0, 2], got
    # a non-overlapping topic still matches only the wildcard subscription, at its QoS
    pub.publish(f"{uid}/b", b"y", 2)
    m = sub.get()
    assert (m.payload, m.qos) == (b"y", 0)
    sub.expect_none(0.2)


def test_overlapping_subscriptions_carry_subscription_identifiers(clients: Clients, uid: str) -> None:
    # MQTT-3.3.4-4 / -5: one copy carries every matching identifier; several copies carry one each.
    sub = clients.connect(f"{uid}-s", version=V5)
    assert sub.subscribe(f"{uid}/#", 1, properties={"SubscriptionIdentifier": 7}) == [1]
    assert sub.subscribe(f"{uid}/+", 1, properties={"SubscriptionIdentifier": 9}) == [1]
    pub = clients.connect(f"{uid}-p", version=V5)
    pub.publish(f"{uid}/a", b"x", 1)
    got = [sub.get()]
    try:
        got.append(sub.get(0.5))
    except TimeoutError:
        pass

    def ids(m: Any) -> list[int]:
        v = m.properties.get("SubscriptionIdentifier", [])
        return sorted(v if isinstance(v, list) else [v])

    if len(got) == 1:
        assert ids(got[0]) == [7, 9]
    else:
        assert sorted(ids(m) for m in got) == [[7], [9]]


@VERSIONS
@pytest.mark.parametrize("qos", [1, 2])
def test_many_messages_arrive_in_order(clients: Clients, uid: str, version: int, qos: int) -> None:
    topic = f"{uid}/order"
    n = 200 if qos == 1 else 100
    sub = clients.connect(f"{uid}-s", version=version)
    assert sub.subscribe(topic, qos) == [qos]
    pub = clients.connect(f"{uid}-p", version=version)
    infos = [pub.publish_nowait(topic, str(i), qos) for i in range(n)]
    for info in infos:
        assert pub.wait_published(info) == 0
    got = sub.get_n(n, timeout=15)
    assert [m.payload for m in got] == [str(i).encode() for i in range(n)]
    assert all(m.qos == qos for m in got)
    sub.expect_none(0.2)


@VERSIONS
def test_many_publishes_in_flight_all_acknowledged(clients: Clients, uid: str, version: int) -> None:
    topic = f"{uid}/inflight"
    sub = clients.connect(f"{uid}-s", version=version)
    assert sub.subscribe(topic, 2) == [2]
    # paho keeps up to 20 unacknowledged (the v5 default Receive Maximum of many brokers, including
    # Mosquitto: a v5 client must not exceed the server's) and queues the rest
    pub = clients.connect(f"{uid}-p", version=version, max_inflight=20)
    infos = [pub.publish_nowait(topic, f"{i}", 1 + i % 2) for i in range(60)]
    assert len({i.mid for i in infos}) == 60
    for info in infos:
        pub.wait_published(info)
    got = sub.get_n(60, timeout=10)
    assert sorted(int(m.payload) for m in got) == list(range(60))
    assert {(int(m.payload), m.qos) for m in got} == {(i, 1 + i % 2) for i in range(60)}


@VERSIONS
@pytest.mark.parametrize("qos", [1, 2])
def test_broker_keeps_several_unacknowledged_messages_in_flight(clients: Clients, uid: str, version: int,
                                                                qos: int) -> None:
    topic = f"{uid}/window"
    sub = clients.connect(f"{uid}-s", version=version, manual_ack=True)
    assert sub.subscribe(topic, qos) == [qos]
    pub = clients.connect(f"{uid}-p", version=version)
    for i in range(10):
        pub.publish(topic, str(i), qos)
    # none acknowledged by the subscriber yet: the broker must use a distinct packet id for each
    got = sub.get_n(10)
    assert [m.payload for m in got] == [str(i).encode() for i in range(10)]
    mids = [m.mid for m in got]
    assert len(set(mids)) == 10 and all(1 <= mid <= 65535 for mid in mids)
    for m in got:
        sub.ack(m)
    # the ids are freed: the flow continues
    for i in range(10, 15):
        pub.publish(topic, str(i), qos)
    got = sub.get_n(5)
    assert [m.payload for m in got] == [str(i).encode() for i in range(10, 15)]
    for m in got:
        sub.ack(m)


@VERSIONS
def test_qos0_subscriber_and_unsubscribe(clients: Clients, uid: str, version: int) -> None:
    topic = f"{uid}/u"
    sub = clients.connect(f"{uid}-s", version=version)
    assert sub.subscribe(topic, 1) == [1]
    pub = clients.connect(f"{uid}-p", version=version)
    pub.publish(topic, b"a", 1)
    assert sub.get().payload == b"a"
    sub.unsubscribe(topic)
    pub.publish(topic, b"b", 1)
    sub.expect_none(0.3)
