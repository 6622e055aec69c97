"""Retained messages: store, replace, clear, wildcard delivery, v5 retain options and expiry."""

from __future__ import annotations

import time
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
def test_retained_message_sent_on_subscribe_with_retain_flag(clients: Clients, uid: str,
                                                             version: int) -> None:
    topic = f"{uid}/r"
    pub = clients.connect(f"{uid}-p", version=version)
    pub.publish(topic, b"kept", 1, retain=True)
    pub.publish(f"{uid}/plain", b"not kept", 1, retain=False)
    sub = clients.connect(f"{uid}-s", version=version)
    assert sub.subscribe(f"{uid}/#", 1) == [1]
    m = sub.get()
    assert (m.topic, m.payload, m.retain, m.qos) == (topic, b"kept", True, 1)
    sub.expect_none(0.3)  # the non-retained message is not replayed


@VERSIONS
def test_live_delivery_clears_retain_flag(clients: Clients, uid: str, version: int) -> None:
    # 3.1.1 MQTT-3.3.1-9; 5.0 MQTT-3.3.1-12 with Retain As Published 0
    topic = f"{uid}/live"
    sub = clients.connect(f"{uid}-s", version=version)
    assert sub.subscribe(topic, 1) == [1]
    pub = clients.connect(f"{uid}-p", version=version)
    pub.publish(topic, b"now", 1, retain=True)
    m = sub.get()
    assert (m.payload, m.retain) == (b"now", False)
    # ...but it was stored: a later subscriber gets it flagged
    late = clients.connect(f"{uid}-l", version=version)
    late.subscribe(topic, 1)
    m = late.get()
    assert (m.payload, m.retain) == (b"now", True)


@VERSIONS
def test_retained_message_replaced_then_cleared(clients: Clients, uid: str, version: int) -> None:
    topic = f"{uid}/r"
    pub = clients.connect(f"{uid}-p", version=version)
    pub.publish(topic, b"first", 1, retain=True)
    pub.publish(topic, b"second", 1, retain=True)
    s1 = clients.connect(f"{uid}-s1", version=version)
    s1.subscribe(topic, 1)
    m = s1.get()
    assert (m.payload, m.retain) == (b"second", True)
    s1.expect_none(0.2)  # only the latest is kept

    pub.publish(topic, b"", 1, retain=True)  # clear
    m = s1.get()  # a zero-length retained publish is still delivered to current subscribers
    assert (m.payload, m.retain) == (b"", False)
    s2 = clients.connect(f"{uid}-s2", version=version)
    s2.subscribe(topic, 1)
    s2.expect_none(0.5)


@VERSIONS
def test_wildcard_subscription_gets_all_matching_retained(clients: Clients, uid: str, version: int) -> None:
    pub = clients.connect(f"{uid}-p", version=version)
    retained = {f"{uid}/a/1": b"a1", f"{uid}/a/2": b"a2", f"{uid}/b/1": b"b1", f"{uid}/a/1/x": b"a1x"}
    for t, p in retained.items():
        pub.publish(t, p, 1, retain=True)

    plus = clients.connect(f"{uid}-plus", version=version)
    plus.subscribe(f"{uid}/a/+", 0)
    got = {m.topic: m.payload for m in plus.get_n(2)}
    assert got == {f"{uid}/a/1": b"a1", f"{uid}/a/2": b"a2"}
    plus.expect_none(0.3)

    hash_ = clients.connect(f"{uid}-hash", version=version)
    hash_.subscribe(f"{uid}/#", 0)
    msgs = hash_.get_n(4)
    assert {m.topic: m.payload for m in msgs} == retained
    assert all(m.retain for m in msgs)
    hash_.expect_none(0.3)


@VERSIONS
def test_retained_qos_is_min_of_stored_and_subscription(clients: Clients, uid: str, version: int) -> None:
    topic = f"{uid}/q"
    pub = clients.connect(f"{uid}-p", version=version)
    pub.publish(topic, b"q1", 1, retain=True)
    for sub_qos, want in ((0, 0), (1, 1), (2, 1)):
        s = clients.connect(f"{uid}-s{sub_qos}", version=version)
        assert s.subscribe(topic, sub_qos) == [sub_qos]
        m = s.get()
        assert (m.payload, m.qos, m.retain) == (b"q1", want, True), sub_qos


@VERSIONS
def test_resubscribe_resends_retained(clients: Clients, uid: str, version: int) -> None:
    # 3.1.1 MQTT-3.8.4-3 / 5.0 Retain Handling 0: retained messages are sent on every SUBSCRIBE
    topic = f"{uid}/again"
    pub = clients.connect(f"{uid}-p", version=version)
    pub.publish(topic, b"r", 0, retain=True)
    s = clients.connect(f"{uid}-s", version=version)
    s.subscribe(topic, 0)
    assert s.get().payload == b"r"
    s.subscribe(topic, 0)
    m = s.get()
    assert (m.payload, m.retain) == (b"r", True)


def test_v5_retain_handling(clients: Clients, uid: str) -> None:
    topic = f"{uid}/rh"
    pub = clients.connect(f"{uid}-p")
    pub.publish(topic, b"r", 1, retain=True)

    # 1: send retained only if the subscription did not exist
    s1 = clients.connect(f"{uid}-s1")
    s1.subscribe(topic, 1, retain_handling=1)
    assert s1.get().payload == b"r"
    s1.subscribe(topic, 1, retain_handling=1)
    s1.expect_none(0.4)

    # 2: never send retained at subscribe
    s2 = clients.connect(f"{uid}-s2")
    s2.subscribe(topic, 1, retain_handling=2)
    s2.expect_none(0.4)
    pub.publish(topic, b"live", 1)
    assert s2.get().payload == b"live"  # the subscription itself works

    # 0: every time
    s0 = clients.connect(f"{uid}-s0")
    s0.subscribe(topic, 1, retain_handling=0)
    assert s0.get().payload == b"r"
    s0.subscribe(topic, 1, retain_handling=0)
    assert s0.get().payload == b"r"


def test_v5_retain_as_published(clients: Clients, uid: str) -> None:
    topic = f"{uid}/rap"
    rap = clients.connect(f"{uid}-rap")
    rap.subscribe(topic, 1, retain_as_published=True)
    plain = clients.connect(f"{uid}-plain")
    plain.subscribe(topic, 1, retain_as_published=False)
    pub = clients.connect(f"{uid}-p")
    pub.publish(topic, b"ret", 1, retain=True)
    pub.publish(topic, b"nonret", 1, retain=False)
    assert [(m.payload, m.retain) for m in rap.get_n(2)] == [(b"ret", True), (b"nonret", False)]
    assert [(m.payload, m.retain) for m in plain.get_n(2)] == [(b"ret", False), (b"nonret", False)]
    pub.publish(topic, b"", 1, retain=True)


def test_v5_retained_message_expiry(clients: Clients, uid: str) -> None:
    topic = f"{uid}/exp"
    pub = clients.connect(f"{uid}-p")
    pub.publish(topic, b"short", 1, retain=True, properties={"MessageExpiryInterval": 1})
    published = time.monotonic()
    pub.publish(f"{uid}/long", b"long", 1, retain=True, properties={"MessageExpiryInterval": 3600})

    s = clients.connect(f"{uid}-s")
    s.subscribe(topic, 1)
    m = s.get()
    assert m.payload == b"short"
    # MQTT-3.3.2-6: forwarded with the remaining lifetime
    assert 0 <= m.properties.get("MessageExpiryInterval", -1) <= 1, m.properties
    s.subscribe(f"{uid}/long", 1)
    m = s.get()
    assert m.payload == b"long"
    assert 3590 <= m.properties.get("MessageExpiryInterval", -1) <= 3600, m.properties

    # once expired it is no longer delivered; poll with fresh subscribers until a deadline (brokers
    # count expiry in whole seconds, so "gone" may come a little before or after 1.0 s)
    deadline = published + 3.5
    while True:
        late = clients.connect(f"{uid}-late{time.monotonic_ns()}")
        late.subscribe(topic, 1)
        try:
            late.get(0.3)
        except TimeoutError:
            break
        late.abort()
        assert time.monotonic() < deadline, "retained message with a 1 s expiry still delivered"
    # the long-lived one is still there
    s2 = clients.connect(f"{uid}-s2")
    s2.subscribe(f"{uid}/long", 1)
    assert s2.get().payload == b"long"
