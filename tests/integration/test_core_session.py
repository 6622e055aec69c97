"""Sessions: persistence across reconnects, offline queues, expiry, in-flight re-send, takeover."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.clients import (
    CONNACK,
    PUBCOMP,
    PUBREC,
    PUBREL,
    V5,
    V311,
    Clients,
    RawClient,
    ack_packet,
    connect_packet,
    publish_packet,
    session_expiry_prop,
)

pytestmark = pytest.mark.integration

VERSIONS = pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])


@pytest.fixture
def clients(broker: Any) -> Iterator[Clients]:
    with Clients(broker) as c:
        yield c


def _persistent(version: int) -> dict[str, Any]:
    """Connect options for a session that outlives the connection."""
    return {"clean": False} if version == V311 else {"clean": False, "session_expiry": 300}


@VERSIONS
def test_persistent_session_keeps_subscriptions_and_queues_offline(clients: Clients, uid: str,
                                                                   version: int) -> None:
    topic = f"{uid}/q"
    s = clients.connect(f"{uid}-s", version=version, **_persistent(version))
    assert s.connack.session_present is False
    assert s.subscribe(topic, 2) == [2]
    s.disconnect()

    pub = clients.connect(f"{uid}-p", version=version)
    for i in range(10):
        pub.publish(topic, f"m{i}", 1 + i % 2)

    s2 = clients.connect(f"{uid}-s", version=version, **_persistent(version))
    assert s2.connack.session_present is True
    got = s2.get_n(10)
    # order is guaranteed per topic *and QoS* (MQTT-4.6.0-6 in 3.1.1 and 5.0)
    for q in (1, 2):
        want = [f"m{i}".encode() for i in range(10) if 1 + i % 2 == q]
        assert [m.payload for m in got if m.qos == q] == want
    assert sorted((m.payload, m.qos) for m in got) == sorted((f"m{i}".encode(), 1 + i % 2) for i in range(10))
    s2.expect_none(0.2)
    # the subscription survived: no new SUBSCRIBE needed
    pub.publish(topic, b"live", 1)
    assert s2.get().payload == b"live"


@VERSIONS
def test_clean_session_discards_stored_session(clients: Clients, uid: str, version: int) -> None:
    topic = f"{uid}/q"
    s = clients.connect(f"{uid}-s", version=version, **_persistent(version))
    s.subscribe(topic, 1)
    s.disconnect()
    pub = clients.connect(f"{uid}-p", version=version)
    pub.publish(topic, b"queued", 1)

    clean = clients.connect(f"{uid}-s", version=version, clean=True)
    assert clean.connack.session_present is False
    clean.expect_none(0.3)  # neither the queued message...
    pub.publish(topic, b"live", 1)
    clean.expect_none(0.3)  # ...nor the old subscription
    clean.disconnect()

    # and the old session is gone for good
    again = clients.connect(f"{uid}-s", version=version, **_persistent(version))
    assert again.connack.session_present is False
    again.expect_none(0.3)


@VERSIONS
def test_clean_connection_has_no_session_after_disconnect(clients: Clients, uid: str, version: int) -> None:
    # v3.1.1 clean_session=1 / v5 clean_start=1 with session expiry 0 (absent): nothing outlives the link
    topic = f"{uid}/q"
    s = clients.connect(f"{uid}-s", version=version, clean=True)
    s.subscribe(topic, 1)
    s.disconnect()
    pub = clients.connect(f"{uid}-p", version=version)
    pub.publish(topic, b"x", 1)
    s2 = clients.connect(f"{uid}-s", version=version, **_persistent(version))
    assert s2.connack.session_present is False
    s2.expect_none(0.3)


def test_v5_session_expiry_zero_vs_positive(clients: Clients, uid: str) -> None:
    topic = f"{uid}/q"
    # clean_start=0 with expiry 0: the session ends when the connection does
    s = clients.connect(f"{uid}-zero", clean=False, session_expiry=0)
    s.subscribe(topic, 1)
    s.disconnect()
    # clean_start=0 with expiry 60: it stays
    k = clients.connect(f"{uid}-kept", clean=False, session_expiry=60)
    k.subscribe(topic, 1)
    k.disconnect()

    pub = clients.connect(f"{uid}-p")
    pub.publish(topic, b"while away", 1)

    s2 = clients.connect(f"{uid}-zero", clean=False, session_expiry=0)
    assert s2.connack.session_present is False
    s2.expect_none(0.3)
    k2 = clients.connect(f"{uid}-kept", clean=False, session_expiry=60)
    assert k2.connack.session_present is True
    assert k2.get().payload == b"while away"


def test_v5_clean_start_discards_existing_session(clients: Clients, uid: str) -> None:
    topic = f"{uid}/q"
    s = clients.connect(f"{uid}-s", clean=False, session_expiry=60)
    s.subscribe(topic, 1)
    s.disconnect()
    fresh = clients.connect(f"{uid}-s", clean=True, session_expiry=60)
    assert fresh.connack.session_present is False
    pub = clients.connect(f"{uid}-p")
    pub.publish(topic, b"x", 1)
    fresh.expect_none(0.3)


def test_v5_disconnect_can_set_session_expiry_to_zero(clients: Clients, uid: str) -> None:
    s = clients.connect(f"{uid}-s", clean=False, session_expiry=60)
    s.subscribe(f"{uid}/q", 1)
    s.disconnect(properties={"SessionExpiryInterval": 0})
    s2 = clients.connect(f"{uid}-s", clean=False, session_expiry=60)
    assert s2.connack.session_present is False


def test_v5_expired_session_is_gone_and_queued_messages_expire(clients: Clients, uid: str) -> None:
    topic = f"{uid}/q"
    s = clients.connect(f"{uid}-s", clean=False, session_expiry=1)
    s.subscribe(topic, 1)
    s.disconnect()
    # a long-lived session on the same topic, to see per-message expiry while offline
    k = clients.connect(f"{uid}-k", clean=False, session_expiry=300)
    k.subscribe(topic, 1)
    k.disconnect()
    gone_at = time.monotonic()
    pub = clients.connect(f"{uid}-p")
    pub.publish(topic, b"expires", 1, properties={"MessageExpiryInterval": 1})
    pub.publish(topic, b"lasts", 1, properties={"MessageExpiryInterval": 600})
    pub.publish(topic, b"forever", 1)
    # waiting out the expiry is the behaviour under test (brokers may count whole seconds)
    time.sleep(max(0.0, gone_at + 2.2 - time.monotonic()))
    s2 = clients.connect(f"{uid}-s", clean=False, session_expiry=60)
    assert s2.connack.session_present is False
    s2.expect_none(0.3)
    pub.publish(topic, b"after", 1)

    # MQTT-3.3.2-5: an expired message is not delivered to the resumed session; the rest are, with
    # their remaining lifetime (MQTT-3.3.2-6)
    k2 = clients.connect(f"{uid}-k", clean=False, session_expiry=300)
    assert k2.connack.session_present is True
    got = k2.get_n(3)
    assert [m.payload for m in got] == [b"lasts", b"forever", b"after"]
    assert 590 <= got[0].properties.get("MessageExpiryInterval", -1) < 600, got[0].properties
    assert "MessageExpiryInterval" not in got[1].properties
    s2.expect_none(0.3)  # the subscription expired with the session


def test_v5_session_not_expired_before_interval(clients: Clients, uid: str) -> None:
    topic = f"{uid}/q"
    s = clients.connect(f"{uid}-s", clean=False, session_expiry=10)
    s.subscribe(topic, 1)
    s.abort()
    pub = clients.connect(f"{uid}-p")
    pub.publish(topic, b"kept", 1)
    s2 = clients.connect(f"{uid}-s", clean=False, session_expiry=10)
    assert s2.connack.session_present is True
    assert s2.get().payload == b"kept"


@VERSIONS
def test_unacknowledged_qos1_resent_with_dup_and_same_packet_id(clients: Clients, uid: str,
                                                                  version: int) -> None:
    topic = f"{uid}/dup"
    s = clients.connect(f"{uid}-s", version=version, manual_ack=True, **_persistent(version))
    s.subscribe(topic, 1)
    pub = clients.connect(f"{uid}-p", version=version)
    pub.publish(topic, b"once more", 1)
    first = s.get()
    assert (first.payload, first.dup) == (b"once more", False)
    s.abort()  # never acknowledged

    s2 = clients.connect(f"{uid}-s", version=version, **_persistent(version))
    assert s2.connack.session_present is True
    again = s2.get()
    assert (again.payload, again.qos, again.dup) == (b"once more", 1, True)
    assert again.mid == first.mid  # MQTT-4.4.0-1: original packet identifier
    s2.expect_none(0.3)  # acknowledged now (auto-ack): not sent a third time
    s2.disconnect()
    s3 = clients.connect(f"{uid}-s", version=version, **_persistent(version))
    s3.expect_none(0.3)


@VERSIONS
def test_qos2_released_message_not_redelivered_after_reconnect(clients: Clients, uid: str,
                                                               version: int) -> None:
    # the subscriber got PUBLISH, sent PUBREC, got PUBREL (paho delivers then) but never sent PUBCOMP:
    # on resumption the broker resends PUBREL, never the PUBLISH (exactly once)
    topic = f"{uid}/q2"
    s = clients.connect(f"{uid}-s", version=version, manual_ack=True, **_persistent(version))
    s.subscribe(topic, 2)
    pub = clients.connect(f"{uid}-p", version=version)
    pub.publish(topic, b"exactly once", 2)
    m = s.get()
    assert (m.payload, m.qos) == (b"exactly once", 2)
    s.abort()

    s2 = clients.connect(f"{uid}-s", version=version, **_persistent(version))
    assert s2.connack.session_present is True
    s2.expect_none(0.5)
    assert any(line.startswith(f"Received PUBREL (Mid: {m.mid})") for line in s2.log), s2.log
    pub.publish(topic, b"next", 2)
    assert s2.get().payload == b"next"


def _raw_persistent(broker: Any, client_id: str, version: int, session_present: bool) -> RawClient:
    r = RawClient(broker)
    props = session_expiry_prop(300) if version == V5 else b""
    r.send(connect_packet(client_id, version=version, clean=False, props=props))
    _, body = r.expect(CONNACK)
    assert body[1] == 0, body
    assert bool(body[0] & 1) is session_present, body
    return r


@VERSIONS
def test_incoming_qos2_state_survives_reconnect(broker: Any, clients: Clients, uid: str,
                                                version: int) -> None:
    # publisher: PUBLISH -> PUBREC, connection lost, resumes the session and sends PUBREL -> PUBCOMP
    topic = f"{uid}/in2"
    sub = clients.connect(f"{uid}-sub", version=version)
    sub.subscribe(topic, 2)
    with _raw_persistent(broker, f"{uid}-p", version, False) as r:
        r.send(publish_packet(topic, b"once", qos=2, mid=7, version=version))
        _, body = r.expect(PUBREC)
        assert body[:2] == b"\x00\x07"
    with _raw_persistent(broker, f"{uid}-p", version, True) as r:
        r.send(ack_packet(PUBREL, 7))
        _, body = r.expect(PUBCOMP)
        assert body[:2] == b"\x00\x07"
    m = sub.get()
    assert (m.payload, m.qos) == (b"once", 2)
    sub.expect_none(0.3)


@VERSIONS
def test_resent_qos2_publish_after_reconnect_delivered_once(broker: Any, clients: Clients, uid: str,
                                                            version: int) -> None:
    # the PUBREC was lost with the connection: the client resends PUBLISH with DUP and the same id;
    # the broker must not deliver it a second time (MQTT-4.3.3 / 4.4)
    topic = f"{uid}/dup2"
    sub = clients.connect(f"{uid}-sub", version=version)
    sub.subscribe(topic, 2)
    with _raw_persistent(broker, f"{uid}-p", version, False) as r:
        r.send(publish_packet(topic, b"once", qos=2, mid=9, version=version))
        r.expect(PUBREC)
    with _raw_persistent(broker, f"{uid}-p", version, True) as r:
        r.send(publish_packet(topic, b"once", qos=2, mid=9, dup=True, version=version))
        _, body = r.expect(PUBREC)
        assert body[:2] == b"\x00\x09"
        r.send(ack_packet(PUBREL, 9))
        r.expect(PUBCOMP)
        # and a new message with the now free id is a new message
        r.send(publish_packet(topic, b"twice", qos=2, mid=9, version=version))
        r.expect(PUBREC)
        r.send(ack_packet(PUBREL, 9))
        r.expect(PUBCOMP)
    got = sub.get_n(2)
    assert [(m.payload, m.qos) for m in got] == [(b"once", 2), (b"twice", 2)]
    sub.expect_none(0.3)


@pytest.mark.shoal_only
def test_offline_queue_limit(make_broker: Callable[..., Any], uid: str) -> None:
    b = make_broker({"mqtt": {"max_queued_messages": 5}})
    with Clients(b) as clients:
        topic = f"{uid}/q"
        s = clients.connect(f"{uid}-s", clean=False, session_expiry=300)
        s.subscribe(topic, 1)
        s.disconnect()
        pub = clients.connect(f"{uid}-p")
        for i in range(12):
            pub.publish(topic, str(i), 1)
        s2 = clients.connect(f"{uid}-s", clean=False, session_expiry=300)
        assert s2.connack.session_present is True
        got = [int(m.payload) for m in s2.get_n(5)]
        s2.expect_none(0.5)  # at most 5 kept
        assert got == sorted(got) and len(set(got)) == 5


@pytest.mark.shoal_only
@pytest.mark.parametrize("queue_qos0", [False, True])
def test_queue_qos0_setting(make_broker: Callable[..., Any], uid: str, queue_qos0: bool) -> None:
    b = make_broker({"mqtt": {"queue_qos0": queue_qos0}})
    with Clients(b) as clients:
        topic = f"{uid}/q"
        s = clients.connect(f"{uid}-s", clean=False, session_expiry=300)
        s.subscribe(topic, 1)
        s.disconnect()
        pub = clients.connect(f"{uid}-p")
        pub.publish(topic, b"zero", 0)
        pub.publish(topic, b"one", 1)
        s2 = clients.connect(f"{uid}-s", clean=False, session_expiry=300)
        want = [(b"zero", 0), (b"one", 1)] if queue_qos0 else [(b"one", 1)]
        assert [(m.payload, m.qos) for m in s2.get_n(len(want))] == want
        s2.expect_none(0.3)


@VERSIONS
def test_takeover_disconnects_first_connection(clients: Clients, uid: str, version: int) -> None:
    topic = f"{uid}/t"
    first = clients.connect(f"{uid}-c", version=version, **_persistent(version))
    first.subscribe(topic, 1)
    second = clients.connect(f"{uid}-c", version=version, **_persistent(version))
    assert second.connack.session_present is True
    first.wait_disconnect()  # MQTT-3.1.4-3 (v5) / MQTT-3.1.4-2 (3.1.1): the old connection is closed
    # the subscription moved to the new connection
    pub = clients.connect(f"{uid}-p", version=version)
    pub.publish(topic, b"to the new one", 1)
    assert second.get().payload == b"to the new one"
    first.expect_none(0.2)
    # the new connection stays up
    pub.publish(topic, b"still", 1)
    assert second.get().payload == b"still"
    assert second.connected


@pytest.mark.shoal_only  # Mosquitto < 2.0.15 just closes the socket (eclipse-mosquitto/mosquitto#2607)
def test_v5_takeover_sends_disconnect_session_taken_over(clients: Clients, uid: str) -> None:
    first = clients.connect(f"{uid}-c", clean=False, session_expiry=60)
    clients.connect(f"{uid}-c", clean=False, session_expiry=60)
    gone = first.wait_disconnect()
    assert gone.from_server, "closed without a DISCONNECT packet"
    assert gone.reason_code == 0x8E, gone  # MQTT-3.1.4-3: Session taken over


def test_takeover_clean_start_gets_fresh_session(clients: Clients, uid: str) -> None:
    first = clients.connect(f"{uid}-c", clean=False, session_expiry=60)
    first.subscribe(f"{uid}/t", 1)
    second = clients.connect(f"{uid}-c", clean=True)
    assert second.connack.session_present is False
    first.wait_disconnect()
    pub = clients.connect(f"{uid}-p")
    pub.publish(f"{uid}/t", b"x", 1)
    second.expect_none(0.3)
