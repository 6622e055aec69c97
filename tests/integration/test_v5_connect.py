"""MQTT 5 CONNECT / CONNACK: assigned client ids, advertised capabilities and the
limits behind them, Request Problem / Response Information."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.v5client import PUBACK, PUBREC, Pool, RawClient, clients

pytestmark = pytest.mark.integration
__all__ = ["clients"]


# --------------------------------------------------------------------------- assigned client id

def test_v5_empty_client_id_gets_assigned_identifier(broker: Any, clients: Pool, uid: str) -> None:
    c = clients.v5(broker, "", connect_props={"SessionExpiryInterval": 60})
    assigned = c.connack_props.get("AssignedClientIdentifier")
    assert assigned, f"CONNACK without Assigned Client Identifier: {c.connack_props}"
    other = clients.v5(broker, "")
    assert other.connack_props.get("AssignedClientIdentifier") not in (None, assigned)

    # the connection works under that identity ...
    topic = f"{uid}/assigned"
    assert c.subscribe((topic, 1)) == [1]
    pub = clients.v5(broker, f"{uid}-pub")
    assert pub.publish(topic, b"one", qos=1) == 0
    assert c.get().payload == b"one"
    c.close()

    # ... and the assigned identifier names the session it left behind
    again = clients.v5(broker, assigned, clean_start=False, connect_props={"SessionExpiryInterval": 0})
    assert again.session_present is True
    assert "AssignedClientIdentifier" not in again.connack_props
    pub.publish(topic, b"two", qos=1)
    assert again.get().payload == b"two"


def test_v311_empty_client_id_with_clean_session_is_accepted(broker: Any, clients: Pool, uid: str) -> None:
    c = clients.v311(broker, "", clean_start=True)
    assert c.connack_code == 0
    topic = f"{uid}/anon"
    assert c.subscribe((topic, 1)) == [1]
    c.publish(topic, b"hello", qos=1)
    assert c.get().payload == b"hello"


def test_v311_empty_client_id_without_clean_session_is_rejected(broker: Any, clients: Pool) -> None:
    raw = clients.raw(broker, version=4)
    connack = raw.connect("", clean=False)
    assert connack.reason == 2, "expected CONNACK return code 2 (identifier rejected)"
    assert connack.session_present is False
    assert raw.recv() is None, "the broker must close the connection after a failed CONNACK"


# --------------------------------------------------------------------------- advertised limits

@pytest.mark.shoal_only
def test_v5_connack_advertises_configured_capabilities(make_broker: Any, clients: Pool, uid: str) -> None:
    b = make_broker({"mqtt": {
        "receive_maximum": 7, "max_packet_size": 4096, "topic_alias_maximum": 5,
        "maximum_qos": 1, "retain_available": False, "wildcard_subscription_available": False,
        "subscription_identifier_available": False, "shared_subscription_available": False}})
    p = clients.v5(b, f"{uid}-c").connack_props
    assert p.get("ReceiveMaximum") == 7
    assert p.get("MaximumPacketSize") == 4096
    assert p.get("TopicAliasMaximum") == 5
    assert p.get("MaximumQoS") == 1
    assert p.get("RetainAvailable") == 0
    assert p.get("WildcardSubscriptionAvailable") == 0
    assert p.get("SubscriptionIdentifierAvailable") == 0
    assert p.get("SharedSubscriptionAvailable") == 0


@pytest.mark.shoal_only
def test_v5_connack_advertises_other_configured_values(make_broker: Any, clients: Pool, uid: str) -> None:
    b = make_broker({"mqtt": {"receive_maximum": 300, "max_packet_size": 100000,
                              "topic_alias_maximum": 0}})
    p = clients.v5(b, f"{uid}-c").connack_props
    assert p.get("ReceiveMaximum") == 300
    assert p.get("MaximumPacketSize") == 100000
    # Topic Alias Maximum 0 (or absent, which means 0): the client may not use aliases
    assert p.get("TopicAliasMaximum", 0) == 0
    # everything not restricted is available: absent or 1, never 0; Maximum QoS absent = 2
    for flag in ("RetainAvailable", "WildcardSubscriptionAvailable",
                 "SubscriptionIdentifierAvailable", "SharedSubscriptionAvailable"):
        assert p.get(flag, 1) == 1, flag
    assert "MaximumQoS" not in p


@pytest.mark.shoal_only
def test_v5_default_connack_is_consistent(broker: Any, clients: Pool, uid: str) -> None:
    p = clients.v5(broker, f"{uid}-c").connack_props
    assert 1 <= p.get("ReceiveMaximum", 65535) <= 65535
    assert p.get("MaximumPacketSize", 268435455) >= 1024
    assert p.get("TopicAliasMaximum", 0) >= 1, "shoal is expected to accept inbound aliases by default"
    assert p.get("RetainAvailable", 1) == 1
    assert p.get("MaximumQoS", 2) == 2


def test_v5_retain_not_available_disconnects_retained_publish(make_broker: Any, clients: Pool,
                                                              uid: str) -> None:
    b = make_broker({"mqtt": {"retain_available": False}})
    c = clients.v5(b, f"{uid}-c")
    assert c.connack_props.get("RetainAvailable") == 0
    c.publish(f"{uid}/r", b"x", qos=0, retain=True)
    d = c.wait_disconnect()
    assert d.from_server and d.reason == 0x9A, d

    # nothing was retained
    s = clients.v5(b, f"{uid}-s")
    assert s.subscribe((f"{uid}/r", 0)) == [0]
    s.expect_no_message()


def test_v5_maximum_qos_1_downgrades_grants_and_rejects_qos2_publish(make_broker: Any, clients: Pool,
                                                                     uid: str) -> None:
    b = make_broker({"mqtt": {"maximum_qos": 1}})
    c = clients.v5(b, f"{uid}-c")
    assert c.connack_props.get("MaximumQoS") == 1
    assert c.subscribe((f"{uid}/q", 2)) == [1]
    assert c.publish(f"{uid}/q", b"ok", qos=1) == 0
    m = c.get()
    assert (m.payload, m.qos) == (b"ok", 1)

    raw = clients.raw(b)
    raw.connect(f"{uid}-raw")
    raw.publish(f"{uid}/q", b"too high", qos=2, pid=1)
    d = raw.wait_disconnect()
    assert d is not None and d.reason == 0x9B, f"expected DISCONNECT 0x9B (QoS not supported), got {d}"
    c.expect_no_message()


def test_v5_wildcard_subscriptions_unavailable(make_broker: Any, clients: Pool, uid: str) -> None:
    b = make_broker({"mqtt": {"wildcard_subscription_available": False}})
    raw = clients.raw(b)
    assert raw.connect(f"{uid}-c").props.get("WildcardSubscriptionAvailable") == 0
    # plain filters still work
    assert raw.subscribe(1, [(f"{uid}/plain", 1)]).reasons == [1]
    kind, codes = raw.suback_or_disconnect(2, [(f"{uid}/+", 1), (f"{uid}/a", 1), (f"{uid}/#", 0)])
    # SUBACK 0xA2 per wildcard filter, or (spec 3.2.2.3.14) DISCONNECT 0xA2
    assert (kind, codes) in [("suback", [0xA2, 1, 0xA2]), ("disconnect", [0xA2])], (kind, codes)


def test_v5_subscription_identifiers_unavailable(make_broker: Any, clients: Pool, uid: str) -> None:
    b = make_broker({"mqtt": {"subscription_identifier_available": False}})
    raw = clients.raw(b)
    assert raw.connect(f"{uid}-c").props.get("SubscriptionIdentifierAvailable") == 0
    kind, codes = raw.suback_or_disconnect(1, [(f"{uid}/t", 1)], {"SubscriptionIdentifier": 3})
    assert (kind, codes) in [("suback", [0xA1]), ("disconnect", [0xA1])], (kind, codes)


def test_v5_shared_subscriptions_unavailable(make_broker: Any, clients: Pool, uid: str) -> None:
    b = make_broker({"mqtt": {"shared_subscription_available": False}})
    raw = clients.raw(b)
    assert raw.connect(f"{uid}-c").props.get("SharedSubscriptionAvailable") == 0
    kind, codes = raw.suback_or_disconnect(1, [(f"$share/g/{uid}/t", 1)])
    assert (kind, codes) in [("suback", [0x9E]), ("disconnect", [0x9E])], (kind, codes)


# --------------------------------------------------------------------------- problem / response info

@pytest.mark.shoal_only
def test_v5_request_problem_information_0_strips_reason_strings(broker: Any, clients: Pool,
                                                                 uid: str) -> None:
    """With Request Problem Information 0 the server MUST NOT send a Reason String or
    User Property on anything but PUBLISH, CONNACK and DISCONNECT (3.1.2.11.7).
    The same failing requests from a default client do carry a Reason String, so the
    absence is the feature, not a broker that never explains itself."""
    def failures(raw: RawClient) -> list[dict[str, Any]]:
        suback = raw.subscribe(1, [(f"{uid}/bad/#/x", 1), (f"{uid}/ok", 1)])
        assert suback.reasons[0] >= 0x80 and suback.reasons[1] == 1, suback
        raw.publish(f"{uid}/pfi", b"\xff\xfe", qos=1, pid=2, props_={"PayloadFormatIndicator": 1})
        puback = raw.expect(PUBACK)
        assert puback.reason == 0x99, puback
        raw.publish(f"{uid}/pfi", b"\xff\xfe", qos=2, pid=3, props_={"PayloadFormatIndicator": 1})
        pubrec = raw.expect(PUBREC)
        assert pubrec.reason == 0x99, pubrec
        return [suback.props, puback.props, pubrec.props]

    chatty = clients.raw(broker)
    chatty.connect(f"{uid}-chatty")
    for p in failures(chatty):
        assert "ReasonString" in p, p

    quiet = clients.raw(broker)
    quiet.connect(f"{uid}-quiet", props_={"RequestProblemInformation": 0})
    for p in failures(quiet):
        assert "ReasonString" not in p and "UserProperty" not in p, p


@pytest.mark.shoal_only
def test_v5_request_response_information(broker: Any, clients: Pool, uid: str) -> None:
    asked = clients.v5(broker, f"{uid}-a", connect_props={"RequestResponseInformation": 1})
    info = asked.connack_props.get("ResponseInformation")
    assert isinstance(info, str) and info, asked.connack_props
    # it is usable as the base of a response topic
    topic = f"{info.rstrip('/')}/{uid}"
    assert asked.subscribe((topic, 1)) == [1]
    asked.publish(topic, b"reply", qos=1)
    assert asked.get().payload == b"reply"

    silent = clients.v5(broker, f"{uid}-b")
    assert "ResponseInformation" not in silent.connack_props
    explicit0 = clients.v5(broker, f"{uid}-c", connect_props={"RequestResponseInformation": 0})
    assert "ResponseInformation" not in explicit0.connack_props
