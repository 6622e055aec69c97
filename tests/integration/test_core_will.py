"""Will messages: abnormal vs normal disconnect, QoS, retain, properties, v5 will delay."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.clients import V5, V311, Client, Clients

pytestmark = pytest.mark.integration

VERSIONS = pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])


@pytest.fixture
def clients(broker: Any) -> Iterator[Clients]:
    with Clients(broker) as c:
        yield c


def _watcher(clients: Clients, uid: str, qos: int = 2) -> Client:
    w = clients.connect(f"{uid}-w")
    assert w.subscribe(f"{uid}/will/#", qos) == [qos]
    return w


@VERSIONS
@pytest.mark.parametrize("will_qos", [0, 1, 2])
def test_will_sent_on_abnormal_disconnect(clients: Clients, uid: str, version: int, will_qos: int) -> None:
    w = _watcher(clients, uid)
    c = clients.new(f"{uid}-c", version=version)
    c.will_set(f"{uid}/will/c", b"gone", qos=will_qos)
    assert c.connect().reason_code == 0
    w.expect_none(0.2)  # not at connect
    c.abort()  # socket closed without DISCONNECT
    m = w.get()
    assert (m.topic, m.payload, m.qos, m.retain) == (f"{uid}/will/c", b"gone", will_qos, False)
    w.expect_none(0.3)  # once


@VERSIONS
def test_will_not_sent_on_normal_disconnect(clients: Clients, uid: str, version: int) -> None:
    w = _watcher(clients, uid)
    c = clients.new(f"{uid}-c", version=version)
    c.will_set(f"{uid}/will/c", b"gone", qos=1)
    c.connect()
    c.disconnect()
    w.expect_none(0.5)
    # the broker is still delivering on this topic: the silence above means "no will", not "broken"
    p = clients.connect(f"{uid}-p")
    p.publish(f"{uid}/will/c", b"probe", 1)
    assert w.get().payload == b"probe"


def test_v5_disconnect_with_will_message_reason_sends_will(clients: Clients, uid: str) -> None:
    w = _watcher(clients, uid)
    c = clients.new(f"{uid}-c")
    c.will_set(f"{uid}/will/c", b"asked for", qos=1)
    c.connect()
    c.disconnect(reason_code=0x04)  # Disconnect with Will Message
    m = w.get()
    assert (m.payload, m.qos) == (b"asked for", 1)


@VERSIONS
def test_will_retain_flag_stores_will_as_retained(clients: Clients, uid: str, version: int) -> None:
    w = _watcher(clients, uid)
    c = clients.new(f"{uid}-c", version=version)
    c.will_set(f"{uid}/will/status", b"offline", qos=1, retain=True)
    c.connect()
    c.abort()
    m = w.get()
    assert m.payload == b"offline"
    late = clients.connect(f"{uid}-late", version=version)
    late.subscribe(f"{uid}/will/status", 1)
    m = late.get()
    assert (m.payload, m.retain, m.qos) == (b"offline", True, 1)
    late.publish(f"{uid}/will/status", b"", 1, retain=True)


def test_v5_will_properties_forwarded(clients: Clients, uid: str) -> None:
    w = _watcher(clients, uid)
    c = clients.new(f"{uid}-c")
    c.will_set(f"{uid}/will/c", b"{}", qos=1, properties={
        "ContentType": "application/json", "UserProperty": [("why", "crash")],
        "ResponseTopic": f"{uid}/resp", "CorrelationData": b"\x01\x02"})
    c.connect()
    c.abort()
    m = w.get()
    assert m.properties.get("ContentType") == "application/json"
    assert m.properties.get("UserProperty") == [("why", "crash")]
    assert m.properties.get("ResponseTopic") == f"{uid}/resp"
    assert m.properties.get("CorrelationData") == b"\x01\x02"


def test_v5_will_delay_interval_delays_will(clients: Clients, uid: str) -> None:
    w = _watcher(clients, uid)
    c = clients.new(f"{uid}-c")
    c.will_set(f"{uid}/will/c", b"late", qos=1, properties={"WillDelayInterval": 2})
    c.connect(session_expiry=60)
    c.abort()
    dropped = time.monotonic()
    w.expect_none(0.8)  # not at once
    m = w.get(timeout=5)
    waited = time.monotonic() - dropped
    assert m.payload == b"late"
    # brokers may count in whole seconds: 2 s delay -> not before ~1 s, and not much later than 3 s
    assert 1.0 <= waited <= 4.0, waited


def test_v5_will_delay_cancelled_by_reconnect(clients: Clients, uid: str) -> None:
    w = _watcher(clients, uid)
    c = clients.new(f"{uid}-c")
    c.will_set(f"{uid}/will/c", b"should not", qos=1, properties={"WillDelayInterval": 1})
    c.connect(session_expiry=60)
    c.abort()
    again = clients.connect(f"{uid}-c", clean=False, session_expiry=60)
    assert again.connack.session_present
    w.expect_none(2.2)  # past the delay (and whole-second rounding): no will
    again.disconnect()


def test_v5_will_sent_at_session_expiry_when_shorter_than_delay(clients: Clients, uid: str) -> None:
    w = _watcher(clients, uid)
    c = clients.new(f"{uid}-c")
    c.will_set(f"{uid}/will/c", b"session ended", qos=1, properties={"WillDelayInterval": 3600})
    c.connect(session_expiry=1)
    c.abort()
    dropped = time.monotonic()
    m = w.get(timeout=4)  # the session ends after ~1 s, long before the will delay
    assert m.payload == b"session ended"
    assert time.monotonic() - dropped <= 3.5


@pytest.mark.shoal_only  # Mosquitto waits the full will delay (eclipse-mosquitto/mosquitto#3505)
def test_v5_will_with_zero_session_expiry_sent_immediately_despite_delay(clients: Clients, uid: str) -> None:
    # MQTT-3.1.2-8 / 3.1.3.2.2: the will goes when the delay passes or the session ends, whichever
    # is first; with session expiry 0 the session ends with the connection, so the will goes at once
    w = _watcher(clients, uid)
    c = clients.new(f"{uid}-c")
    c.will_set(f"{uid}/will/c", b"now", qos=1, properties={"WillDelayInterval": 3600})
    c.connect(session_expiry=0)
    c.abort()
    assert w.get(timeout=2).payload == b"now"


@VERSIONS
def test_will_cleared_after_being_sent_and_not_sent_again(clients: Clients, uid: str, version: int) -> None:
    w = _watcher(clients, uid)
    c = clients.new(f"{uid}-c", version=version)
    c.will_set(f"{uid}/will/c", b"w1", qos=1)
    c.connect()
    c.abort()
    assert w.get().payload == b"w1"
    # a new connection without a will, dropped: nothing more
    c2 = clients.connect(f"{uid}-c", version=version)
    c2.abort()
    w.expect_none(0.5)
