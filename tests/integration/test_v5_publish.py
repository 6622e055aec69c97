"""MQTT 5 PUBLISH features: topic aliases both ways, Receive Maximum both ways,
Maximum Packet Size both ways, message expiry, property passthrough, payload format."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.integration.v5client import (DISCONNECT, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, QUIET,
                                        Msg, Pool, clients)

pytestmark = pytest.mark.integration
__all__ = ["clients"]


# --------------------------------------------------------------------------- topic alias, inbound

def test_v5_inbound_topic_alias_is_resolved(broker: Any, clients: Pool, uid: str) -> None:
    sub = clients.v5(broker, f"{uid}-s")
    assert sub.subscribe((f"{uid}/alias/#", 1)) == [1]
    pub = clients.v5(broker, f"{uid}-p")
    assert pub.connack_props.get("TopicAliasMaximum", 0) >= 2, pub.connack_props

    one, two = f"{uid}/alias/one", f"{uid}/alias/two"
    assert pub.publish(one, b"1", qos=1, TopicAlias=1) == 0    # set alias 1
    assert pub.publish("", b"2", qos=1, TopicAlias=1) == 0     # use alias 1
    assert pub.publish(two, b"3", qos=1, TopicAlias=2) == 0    # set alias 2
    assert pub.publish("", b"4", qos=0, TopicAlias=2) is None  # use alias 2 (QoS 0 too)
    assert pub.publish(two, b"5", qos=1, TopicAlias=1) == 0    # remap alias 1
    assert pub.publish("", b"6", qos=1, TopicAlias=1) == 0
    assert pub.publish("", b"7", qos=1, TopicAlias=2) == 0

    msgs = sub.collect(7)
    got = [(m.topic, m.payload) for m in msgs]
    assert got == [(one, b"1"), (one, b"2"), (two, b"3"), (two, b"4"), (two, b"5"), (two, b"6"),
                   (two, b"7")]
    # an alias is per connection and per direction: this subscriber never allowed any
    # (no Topic Alias Maximum in its CONNECT), so none may reach it
    assert not [m for m in msgs if "TopicAlias" in m.props]


def test_v5_inbound_topic_alias_above_maximum_disconnects(broker: Any, clients: Pool, uid: str) -> None:
    pub = clients.v5(broker, f"{uid}-p")
    maximum = pub.connack_props.get("TopicAliasMaximum", 0)
    assert maximum >= 1
    pub.publish(f"{uid}/t", b"x", qos=0, TopicAlias=maximum + 1)
    d = pub.wait_disconnect()
    assert d.from_server and d.reason == 0x94, d     # Topic Alias invalid


@pytest.mark.parametrize("maximum", [2, 0])
def test_v5_configured_topic_alias_maximum_is_enforced(make_broker: Any, clients: Pool, uid: str,
                                                       maximum: int) -> None:
    b = make_broker({"mqtt": {"topic_alias_maximum": maximum}})
    sub = clients.v5(b, f"{uid}-s")
    assert sub.subscribe((f"{uid}/#", 0)) == [0]
    pub = clients.v5(b, f"{uid}-p")
    assert pub.connack_props.get("TopicAliasMaximum", 0) == maximum
    if maximum:
        pub.publish(f"{uid}/a", b"ok", qos=1, TopicAlias=maximum)
        pub.publish("", b"again", qos=1, TopicAlias=maximum)
        assert [(m.topic, m.payload) for m in sub.collect(2)] == [(f"{uid}/a", b"ok"), (f"{uid}/a", b"again")]
    pub.publish(f"{uid}/b", b"too far", qos=0, TopicAlias=maximum + 1)
    d = pub.wait_disconnect()
    assert d.from_server and d.reason == 0x94, d
    sub.expect_no_message()


def test_v5_inbound_unknown_topic_alias_disconnects(broker: Any, clients: Pool, uid: str) -> None:
    """An empty topic with an alias the client never mapped is a Protocol Error (3.3.4)."""
    sub = clients.v5(broker, f"{uid}-s")
    assert sub.subscribe(("#", 0)) == [0]   # would see the message if it were routed anywhere
    sub.drain(0.2)                          # retained messages of earlier tests
    raw = clients.raw(broker)
    raw.connect(f"{uid}-p")
    raw.publish("", f"{uid}-orphan".encode(), qos=1, pid=1, props_={"TopicAlias": 1})
    d = raw.wait_disconnect()
    assert d is not None and d.reason == 0x82, f"expected DISCONNECT 0x82, got {d}"
    assert not [m for m in sub.drain(0.3) if m.payload == f"{uid}-orphan".encode()]


def test_v5_inbound_topic_alias_zero_disconnects(broker: Any, clients: Pool, uid: str) -> None:
    """Topic Alias 0 is not permitted (MQTT-3.3.2-8). The spec names no reason code for
    it: DISCONNECT with 0x94 (Topic Alias invalid), 0x82 (Protocol Error) or 0x81
    (Malformed Packet, Mosquitto's choice) are all fair; forwarding it is not."""
    topic = f"{uid}/zero"
    sub = clients.v5(broker, f"{uid}-s")
    assert sub.subscribe((topic, 0)) == [0]
    raw = clients.raw(broker)
    raw.connect(f"{uid}-p")
    raw.publish(topic, b"x", qos=0, props_=bytes([35, 0, 0]))   # Topic Alias 0
    d = raw.wait_disconnect()
    assert d is not None and d.reason in (0x81, 0x82, 0x94), f"expected an error DISCONNECT, got {d}"
    sub.expect_no_message()


def test_v5_no_outbound_alias_without_topic_alias_maximum(broker: Any, clients: Pool, uid: str) -> None:
    sub = clients.v5(broker, f"{uid}-s")
    topic = f"{uid}/noalias"
    assert sub.subscribe((topic, 1)) == [1]
    pub = clients.v5(broker, f"{uid}-p")
    for i in range(5):
        pub.publish(topic, str(i).encode(), qos=1)
    for m in sub.collect(5):
        assert m.topic == topic and "TopicAlias" not in m.props, m


# --------------------------------------------------------------------------- topic alias, outbound

def _resolve(msgs: list[Msg], maximum: int) -> list[tuple[str, bytes]]:
    """Resolve aliases the way a receiver must; fails on an alias it never learnt."""
    aliases: dict[int, str] = {}
    out = []
    for m in msgs:
        alias = m.props.get("TopicAlias")
        if alias is not None:
            assert 1 <= alias <= maximum, f"alias {alias} outside 1..{maximum}"
            if m.topic:
                aliases[alias] = m.topic
            else:
                assert alias in aliases, f"alias {alias} used before it was set"
        else:
            assert m.topic, "empty topic without alias"
        out.append((m.topic or aliases[alias], m.payload))
    return out


@pytest.mark.shoal_only
def test_v5_outbound_topic_alias_used_for_repeated_topic(broker: Any, clients: Pool, uid: str) -> None:
    sub = clients.v5(broker, f"{uid}-s", connect_props={"TopicAliasMaximum": 5})
    topic = f"{uid}/outbound/alias"
    assert sub.subscribe((topic, 1)) == [1]
    pub = clients.v5(broker, f"{uid}-p")
    for i in range(4):
        pub.publish(topic, str(i).encode(), qos=1)
    msgs = sub.collect(4)
    first, rest = msgs[0], msgs[1:]
    assert first.topic == topic and "TopicAlias" in first.props, first
    alias = first.props["TopicAlias"]
    for m in rest:
        # the alias is reused and the topic name left out: that is the point of it
        assert m.props.get("TopicAlias") == alias and m.topic == "", m
    assert _resolve(msgs, 5) == [(topic, str(i).encode()) for i in range(4)]


@pytest.mark.shoal_only
def test_v5_outbound_topic_alias_with_more_topics_than_aliases(broker: Any, clients: Pool,
                                                               uid: str) -> None:
    """With one alias and three alternating topics every delivery must still resolve
    to its own topic, whatever the broker's replacement policy."""
    sub = clients.v5(broker, f"{uid}-s", connect_props={"TopicAliasMaximum": 1})
    assert sub.subscribe((f"{uid}/many/+", 1)) == [1]
    pub = clients.v5(broker, f"{uid}-p")
    sent = []
    for i in range(12):
        topic = f"{uid}/many/{'abc'[i % 3] if i < 9 else 'a'}"
        pub.publish(topic, str(i).encode(), qos=1)
        sent.append((topic, str(i).encode()))
    msgs = sub.collect(12)
    assert _resolve(msgs, 1) == sent
    assert any(m.topic == "" for m in msgs[9:]), "repeated topic never used the alias"


@pytest.mark.shoal_only
def test_v5_outbound_topic_aliases_do_not_survive_reconnect(broker: Any, clients: Pool, uid: str) -> None:
    """Alias mappings last for one network connection (3.3.2.3.4): after a reconnect
    the broker must set an alias again before leaving the topic out, and must not
    alias at all for a connection that allows none."""
    topic, cid = f"{uid}/reconnect", f"{uid}-s"
    cprops = {"TopicAliasMaximum": 5, "SessionExpiryInterval": 300}
    sub = clients.v5(broker, cid, connect_props=cprops)
    assert sub.subscribe((topic, 1)) == [1]
    pub = clients.v5(broker, f"{uid}-p")
    for i in range(2):
        pub.publish(topic, f"live{i}".encode(), qos=1)
    live = sub.collect(2)
    assert live[1].topic == "" and "TopicAlias" in live[1].props     # the alias was in use
    sub.close()

    for i in range(2):
        pub.publish(topic, f"queued{i}".encode(), qos=1)
    again = clients.v5(broker, cid, clean_start=False, connect_props=cprops)
    assert again.session_present
    msgs = again.collect(2)
    assert msgs[0].topic == topic, msgs[0]
    assert _resolve(msgs, 5) == [(topic, b"queued0"), (topic, b"queued1")]
    again.close()

    pub.publish(topic, b"plain", qos=1)
    third = clients.v5(broker, cid, clean_start=False, connect_props={"SessionExpiryInterval": 300})
    m = third.get()
    assert (m.topic, m.payload) == (topic, b"plain") and "TopicAlias" not in m.props, m


# --------------------------------------------------------------------------- receive maximum

def _window_setup(clients: Pool, broker: Any, uid: str, n: int) -> Any:
    sub = clients.v5(broker, f"{uid}-s", manual_ack=True, connect_props={"ReceiveMaximum": 2})
    topic = f"{uid}/rm"
    assert sub.subscribe((topic, 1)) == [1]
    pub = clients.v5(broker, f"{uid}-p")
    for i in range(n):
        assert pub.publish(topic, str(i).encode(), qos=1) == 0
    return sub


def test_v5_broker_honours_client_receive_maximum(broker: Any, clients: Pool, uid: str) -> None:
    sub = _window_setup(clients, broker, uid, 6)
    got = sub.collect(2)
    sub.expect_no_message()           # two unacknowledged: the broker must wait
    for m in got:
        sub.ack(m)
    while len(got) < 6:               # the rest follow as the window reopens
        m = sub.get()
        sub.ack(m)
        got.append(m)
    assert [m.payload for m in got] == [str(i).encode() for i in range(6)]
    assert all(m.qos == 1 for m in got)
    sub.expect_no_message()


@pytest.mark.shoal_only
def test_v5_receive_maximum_window_never_exceeded(broker: Any, clients: Pool, uid: str) -> None:
    """Each PUBACK opens exactly one slot. (Mosquitto 2.0.11 sends two per PUBACK here,
    its db__message_delete_outgoing bug, eclipse/mosquitto#2301, hence shoal_only.)"""
    sub = _window_setup(clients, broker, uid, 6)
    window = sub.collect(2)
    sub.expect_no_message()
    sub.ack(window[0])
    third = sub.get()
    sub.expect_no_message()           # still two outstanding: 1 and 2
    sub.ack(window[1])
    sub.ack(third)
    fourth_fifth = sub.collect(2)
    sub.expect_no_message()
    sub.ack(fourth_fifth[0])
    sixth = sub.get()
    sub.ack(fourth_fifth[1])
    sub.ack(sixth)
    got = window + [third] + fourth_fifth + [sixth]
    assert [m.payload for m in got] == [str(i).encode() for i in range(6)]
    sub.expect_no_message()


@pytest.mark.shoal_only
def test_v5_resent_inflight_respects_new_receive_maximum(broker: Any, clients: Pool, uid: str) -> None:
    """Send quota and Receive Maximum are per connection (4.9); a resumed session's
    unacknowledged PUBLISHes are resent with DUP and their packet ids (MQTT-4.4.0-1),
    but a resent PUBLISH is a QoS>0 PUBLISH like any other: with the new connection's
    Receive Maximum 1 only one may be outstanding (MQTT-4.9.0-2). (Mosquitto 2.0.11
    resends all of them at once: shoal_only.)"""
    topic, cid = f"{uid}/resend", f"{uid}-s"
    first = clients.raw(broker)
    first.connect(cid, props_={"SessionExpiryInterval": 300, "ReceiveMaximum": 10})
    assert first.subscribe(1, [(topic, 1)]).reasons == [1]
    pub = clients.v5(broker, f"{uid}-p")
    for i in range(4):
        pub.publish(topic, str(i).encode(), qos=1)
    original = [first.expect(PUBLISH) for _ in range(4)]        # never acknowledged
    first.close()

    again = clients.raw(broker)
    assert again.connect(cid, clean=False, props_={"SessionExpiryInterval": 0,
                                                   "ReceiveMaximum": 1}).session_present
    for orig in original:
        p = again.expect(PUBLISH)
        assert (p.payload, p.pid, bool(p.flags & 0x08)) == (orig.payload, orig.pid, True), p
        with pytest.raises(TimeoutError):
            again.recv(QUIET)          # window of one: nothing more until this PUBACK
        again.ack(PUBACK, p.pid)


def test_v5_receive_maximum_counts_qos2_until_pubcomp(broker: Any, clients: Pool, uid: str) -> None:
    """A QoS 2 delivery holds its slot until PUBCOMP, not PUBREC (4.9)."""
    topic = f"{uid}/rm2"
    raw = clients.raw(broker)
    raw.connect(f"{uid}-s", props_={"ReceiveMaximum": 1})
    assert raw.subscribe(1, [(topic, 2)]).reasons == [2]
    pub = clients.v5(broker, f"{uid}-p")
    pub.publish(topic, b"one", qos=2)
    pub.publish(topic, b"two", qos=2)
    first = raw.expect(PUBLISH)
    assert (first.payload, first.qos) == (b"one", 2)
    raw.ack(PUBREC, first.pid)
    assert raw.expect(PUBREL).pid == first.pid
    with pytest.raises(TimeoutError):
        raw.recv(QUIET)              # slot still taken until PUBCOMP
    raw.ack(PUBCOMP, first.pid)
    second = raw.expect(PUBLISH)
    assert (second.payload, second.qos) == (b"two", 2)


@pytest.mark.shoal_only
def test_v5_message_expires_while_waiting_for_window(broker: Any, clients: Pool, uid: str) -> None:
    """A message whose expiry passes before onward delivery started is dropped
    (3.3.2.3.3), also for an online client whose window is full, and the queue behind
    it moves on. (Mosquitto 2.0.11 stalls its queue here and then loses "last":
    shoal_only.)"""
    sub = clients.v5(broker, f"{uid}-s", manual_ack=True, connect_props={"ReceiveMaximum": 1})
    topic = f"{uid}/win"
    assert sub.subscribe((topic, 1)) == [1]
    pub = clients.v5(broker, f"{uid}-p")
    pub.publish(topic, b"first", qos=1)
    pub.publish(topic, b"doomed", qos=1, MessageExpiryInterval=1)
    pub.publish(topic, b"last", qos=1)
    m = sub.get()
    assert m.payload == b"first"
    time.sleep(2.1)                  # let "doomed" expire while the window is full
    sub.ack(m)
    m = sub.get()
    assert m.payload == b"last", m
    sub.ack(m)
    sub.expect_no_message()


@pytest.mark.shoal_only
def test_v5_client_exceeding_broker_receive_maximum_is_disconnected(make_broker: Any, clients: Pool,
                                                                     uid: str) -> None:
    """QoS 2 keeps a PUBLISH outstanding until the client's PUBREL, so exactly the
    third un-released one exceeds Receive Maximum 2, however fast the broker is.
    (Mosquitto answers PUBREC 0x97 instead, eclipse/mosquitto#3611: shoal_only.)"""
    b = make_broker({"mqtt": {"receive_maximum": 2}})
    ok = clients.raw(b)
    assert ok.connect(f"{uid}-ok").props.get("ReceiveMaximum") == 2
    # within the window, and the window reopens after PUBREL/PUBCOMP
    for round_ in range(2):
        pids = [10 * round_ + 1, 10 * round_ + 2]
        ok.send(b"".join(ok.publish_packet(f"{uid}/t", b"ok", qos=2, pid=p) for p in pids))
        for p in pids:
            assert ok.expect(PUBREC).pid == p
        for p in pids:
            ok.ack(PUBREL, p)
            assert ok.expect(PUBCOMP).pid == p

    bad = clients.raw(b)
    bad.connect(f"{uid}-bad")
    bad.send(b"".join(bad.publish_packet(f"{uid}/t", b"x", qos=2, pid=p) for p in (1, 2, 3)))
    d = bad.wait_disconnect()
    assert d is not None and d.reason == 0x93, f"expected DISCONNECT 0x93 (Receive Maximum exceeded), got {d}"


# --------------------------------------------------------------------------- maximum packet size

def test_v5_broker_respects_client_maximum_packet_size(broker: Any, clients: Pool, uid: str) -> None:
    topic = f"{uid}/mps"
    small = clients.v5(broker, f"{uid}-small", connect_props={"MaximumPacketSize": 256})
    assert small.subscribe((topic, 1)) == [1]
    normal = clients.v5(broker, f"{uid}-normal")
    assert normal.subscribe((topic, 1)) == [1]
    pub = clients.v5(broker, f"{uid}-p")
    pub.publish(topic, b"a" * 16, qos=1)
    pub.publish(topic, b"B" * 1000, qos=1)
    pub.publish(topic, b"c" * 16, qos=0)
    pub.publish(topic, b"D" * 1000, qos=0)
    pub.publish(topic, b"F" * 16, qos=1, UserProperty=[("k", "v" * 300)])   # big by its properties
    pub.publish(topic, b"e" * 16, qos=1)

    assert [m.payload for m in normal.collect(6)] == [b"a" * 16, b"B" * 1000, b"c" * 16, b"D" * 1000,
                                                      b"F" * 16, b"e" * 16]
    # too big for this client: discarded, not queued, and the connection lives on
    assert [m.payload for m in small.collect(3)] == [b"a" * 16, b"c" * 16, b"e" * 16]
    small.expect_no_message()
    assert small.disconnects.empty()


def test_v5_client_exceeding_broker_maximum_packet_size_is_disconnected(make_broker: Any,
                                                                         clients: Pool, uid: str) -> None:
    b = make_broker({"mqtt": {"max_packet_size": 1024}})
    sub = clients.v5(b, f"{uid}-s")
    assert sub.connack_props.get("MaximumPacketSize") == 1024
    topic = f"{uid}/big"
    assert sub.subscribe((topic, 1)) == [1]
    raw = clients.raw(b)
    raw.connect(f"{uid}-p")
    raw.publish(topic, b"x" * 900, qos=1, pid=1)       # fits
    assert raw.expect(PUBACK).reason == 0
    raw.publish(topic, b"y" * 2000, qos=1, pid=2)      # does not
    d = raw.wait_disconnect()
    assert d is not None and d.reason == 0x95, f"expected DISCONNECT 0x95 (Packet too large), got {d}"
    assert sub.get().payload == b"x" * 900
    sub.expect_no_message()


# --------------------------------------------------------------------------- message expiry

def _persistent_subscriber(clients: Pool, broker: Any, cid: str, topic: str) -> None:
    s = clients.v5(broker, cid, connect_props={"SessionExpiryInterval": 300})
    assert s.subscribe((topic, 1)) == [1]
    s.close()


def test_v5_message_expiry_counts_down_while_queued(broker: Any, clients: Pool, uid: str) -> None:
    topic, cid = f"{uid}/exp", f"{uid}-s"
    _persistent_subscriber(clients, broker, cid, topic)
    pub = clients.v5(broker, f"{uid}-p")
    pub.publish(topic, b"later", qos=1, MessageExpiryInterval=10)
    time.sleep(1.2)                                   # the time being measured, not a sync
    s = clients.v5(broker, cid, clean_start=False, connect_props={"SessionExpiryInterval": 300})
    assert s.session_present
    m = s.get()
    assert m.payload == b"later"
    remaining = m.props.get("MessageExpiryInterval")
    assert remaining is not None and 0 < remaining < 10, m.props


def test_v5_expired_message_is_not_delivered(broker: Any, clients: Pool, uid: str) -> None:
    topic, cid = f"{uid}/exp", f"{uid}-s"
    _persistent_subscriber(clients, broker, cid, topic)
    pub = clients.v5(broker, f"{uid}-p")
    pub.publish(topic, b"stale", qos=1, MessageExpiryInterval=1)
    pub.publish(topic, b"fresh", qos=1)
    pub.publish(topic, b"long", qos=1, MessageExpiryInterval=3600)
    time.sleep(2.1)             # > 1 s even for a broker that keeps whole-second clocks
    s = clients.v5(broker, cid, clean_start=False, connect_props={"SessionExpiryInterval": 300})
    assert s.session_present
    got = s.collect(2)
    assert [m.payload for m in got] == [b"fresh", b"long"]
    assert "MessageExpiryInterval" not in got[0].props
    assert 3590 < got[1].props.get("MessageExpiryInterval", 0) <= 3600
    s.expect_no_message()


def test_v5_expired_retained_message_is_not_delivered(broker: Any, clients: Pool, uid: str) -> None:
    pub = clients.v5(broker, f"{uid}-p")
    pub.publish(f"{uid}/ret/stale", b"stale", qos=1, retain=True, MessageExpiryInterval=1)
    pub.publish(f"{uid}/ret/fresh", b"fresh", qos=1, retain=True, MessageExpiryInterval=3600)
    time.sleep(2.1)
    s = clients.v5(broker, f"{uid}-s")
    assert s.subscribe((f"{uid}/ret/#", 1)) == [1]
    m = s.get()
    assert (m.topic, m.payload, m.retain) == (f"{uid}/ret/fresh", b"fresh", True)
    assert 3590 < m.props.get("MessageExpiryInterval", 0) < 3600
    s.expect_no_message()
    pub.publish(f"{uid}/ret/fresh", b"", qos=1, retain=True)   # clean up


def test_v5_messages_published_right_after_disconnect_are_kept(broker: Any, clients: Pool,
                                                               uid: str) -> None:
    """A normal DISCONNECT with a Session Expiry Interval leaves the session behind; QoS 1
    messages routed to it while the broker is still tearing the connection down must be
    queued (or kept in flight and resent), never dropped. The race is the point, so it
    is run a few times."""
    pub = clients.raw(broker)
    pub.connect(f"{uid}-p")
    pid = 0
    for i in range(10):
        cid, topic = f"{uid}-s{i}", f"{uid}/gone/{i}"
        sub = clients.raw(broker)
        sub.connect(cid, props_={"SessionExpiryInterval": 300})
        assert sub.subscribe(1, [(topic, 1)]).reasons == [1]
        sub.disconnect()
        sub.close()
        pub.send(b"".join(pub.publish_packet(topic, f"q{k}".encode(), qos=1, pid=pid + k + 1)
                          for k in range(3)))
        for k in range(3):
            assert pub.expect(PUBACK).reason in (0, 0x10)
        pid += 3

        again = clients.raw(broker)
        assert again.connect(cid, clean=False, props_={"SessionExpiryInterval": 0}).session_present
        got = []
        for _ in range(3):
            p = again.expect(PUBLISH)
            got.append(p.payload)
            again.ack(PUBACK, p.pid)
        assert got == [b"q0", b"q1", b"q2"], f"iteration {i}: {got}"
        again.disconnect()


# --------------------------------------------------------------------------- passthrough

def test_v5_publish_properties_pass_through_unchanged(broker: Any, clients: Pool, uid: str) -> None:
    topic = f"{uid}/props"
    sub = clients.v5(broker, f"{uid}-s")
    assert sub.subscribe((topic, 1)) == [1]
    pub = clients.v5(broker, f"{uid}-p")
    user = [("b", "1"), ("a", "2"), ("b", "3"), ("ünï", "cödé"), ("empty", "")]
    pub.publish(topic, "héllo".encode(), qos=1,
                UserProperty=user, ContentType="text/plain; charset=utf-8",
                PayloadFormatIndicator=1, ResponseTopic=f"{uid}/reply",
                CorrelationData=b"\x00\x01\xfe\xff", MessageExpiryInterval=3600)
    m = sub.get()
    assert m.payload == "héllo".encode()
    p = m.props
    assert p.get("UserProperty") == user          # order and repeated keys kept
    assert p.get("ContentType") == "text/plain; charset=utf-8"
    assert p.get("PayloadFormatIndicator") == 1
    assert p.get("ResponseTopic") == f"{uid}/reply"
    assert p.get("CorrelationData") == b"\x00\x01\xfe\xff"
    assert 3590 < p.get("MessageExpiryInterval", 0) <= 3600

    # and a plain publish carries none of them (nothing sticks to the topic)
    pub.publish(topic, b"plain", qos=1)
    m = sub.get()
    assert m.payload == b"plain"
    assert not {"UserProperty", "ContentType", "PayloadFormatIndicator", "ResponseTopic",
                "CorrelationData", "MessageExpiryInterval"} & set(m.props), m.props


def test_v5_request_response_round_trip(broker: Any, clients: Pool, uid: str) -> None:
    server = clients.v5(broker, f"{uid}-server")
    assert server.subscribe((f"{uid}/req", 1)) == [1]
    client = clients.v5(broker, f"{uid}-client")
    assert client.subscribe((f"{uid}/resp/+", 1)) == [1]
    client.publish(f"{uid}/req", b"ping", qos=1, ResponseTopic=f"{uid}/resp/1", CorrelationData=b"id-42")
    req = server.get()
    server.publish(req.props["ResponseTopic"], b"pong", qos=1,
                   CorrelationData=req.props["CorrelationData"])
    resp = client.get()
    assert (resp.topic, resp.payload, resp.props.get("CorrelationData")) == (
        f"{uid}/resp/1", b"pong", b"id-42")


@pytest.mark.shoal_only
def test_v5_payload_format_invalid(broker: Any, clients: Pool, uid: str) -> None:
    """Payload Format Indicator 1 says UTF-8. 3.3.2.3.2: the receiver MAY validate and,
    if the payload is not valid UTF-8, answer with PUBACK/PUBREC or DISCONNECT 0x99.
    Either way the message must not be forwarded. (Mosquitto 2.0 does not validate,
    which the MAY allows: shoal_only.)"""
    topic = f"{uid}/pfi"
    sub = clients.v5(broker, f"{uid}-s")
    assert sub.subscribe((topic, 1)) == [1]
    raw = clients.raw(broker)
    raw.connect(f"{uid}-p")
    raw.publish(topic, b"ok \xc3\xa9", qos=1, pid=1, props_={"PayloadFormatIndicator": 1})
    assert raw.expect(PUBACK).reason == 0
    raw.publish(topic, b"bad \xc3\x28 \xff", qos=1, pid=2, props_={"PayloadFormatIndicator": 1})
    p = raw.recv()
    assert p is not None, "closed without PUBACK or DISCONNECT"
    assert (p.type, p.reason) in {(PUBACK, 0x99), (DISCONNECT, 0x99)}, p
    if p.type == PUBACK:
        assert p.pid == 2
    m = sub.get()
    assert m.payload == b"ok \xc3\xa9"
    sub.expect_no_message()
