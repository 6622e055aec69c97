"""Broker semantics, sans-IO: a Shard fed packets, time passed in."""

from __future__ import annotations

from shards.protocol.errors import Reason
from shards.protocol.packets import (
    MQTT_5, MQTT_311, Connack, Connect, Disconnect, Pingreq, Pingresp, Prop, Puback, Pubcomp, Publish,
    Pubrec, Pubrel, Suback, SubOptions, Subscribe, Unsuback, Unsubscribe, Will,
)
from shards.config import MQTTConfig
from shards.host import LocalHost
from shards.shard import Shard
from tests.unit.shardkit import FakeLink, connect, make_shard, publishes, subscribe


def connack(link) -> Connack:
    packets = link.received()
    assert isinstance(packets[0], Connack), packets
    return packets[0]


def test_connack_advertises_limits() -> None:
    shard = make_shard(receive_maximum=7, topic_alias_maximum=3, max_packet_size=4096)
    ack = connack(connect(shard, "c1"))
    assert ack.reason_code == 0 and not ack.session_present
    assert ack.props[Prop.RECEIVE_MAXIMUM] == 7
    assert ack.props[Prop.TOPIC_ALIAS_MAXIMUM] == 3
    assert ack.props[Prop.MAXIMUM_PACKET_SIZE] == 4096


def test_empty_client_id_is_assigned_in_v5_and_refused_for_v311_persistent() -> None:
    shard = make_shard()
    ack = connack(connect(shard, ""))
    assert ack.props[Prop.ASSIGNED_CLIENT_IDENTIFIER].startswith("shoal-")
    link = connect(shard, "", version=MQTT_311, clean_start=False)
    assert connack(link).reason_code == Reason.CLIENT_IDENTIFIER_NOT_VALID
    assert link.closed


def test_qos1_delivery_downgrade_and_ack() -> None:
    shard = make_shard()
    sub = connect(shard, "sub")
    sub.received()
    assert subscribe(sub, "a/+", qos=1)[0] == Suback(1, [1])
    pub = connect(shard, "pub")
    pub.received()
    pub.send(Publish("a/b", b"x", qos=2, packet_id=5))
    assert pub.received() == [Pubrec(5)]
    got = publishes(sub.received())
    assert len(got) == 1 and got[0].qos == 1 and got[0].packet_id == 1
    pub.send(Pubrel(5))
    assert pub.received() == [Pubcomp(5)]
    # the subscriber's ack frees the packet id
    sub.send(Puback(1))
    assert not sub.session.inflight


def test_qos2_duplicate_publish_is_not_routed_twice() -> None:
    shard = make_shard()
    sub = connect(shard, "sub")
    subscribe(sub, "t", qos=2)
    pub = connect(shard, "pub")
    pub.received()
    pub.send(Publish("t", b"1", qos=2, packet_id=9))
    pub.send(Publish("t", b"1", qos=2, packet_id=9, dup=True))
    assert pub.received() == [Pubrec(9), Pubrec(9)]
    assert len(publishes(sub.received())) == 1


def test_no_matching_subscribers_reason_in_v5() -> None:
    shard = make_shard()
    pub = connect(shard, "pub")
    pub.received()
    pub.send(Publish("nobody/home", b"x", qos=1, packet_id=2))
    assert pub.received() == [Puback(2, Reason.NO_MATCHING_SUBSCRIBERS)]


def test_dollar_topics_do_not_match_leading_wildcards() -> None:
    shard = make_shard()
    sub = connect(shard, "sub")
    subscribe(sub, "#")
    subscribe(sub, "+/x", pid=2)
    subscribe(sub, "$app/#", pid=3)
    pub = connect(shard, "pub")
    pub.send(Publish("$app/x", b"1"))
    pub.send(Publish("plain/x", b"2"))
    got = publishes(sub.received())
    assert [p.payload for p in got] == [b"1", b"2"]


def test_overlapping_subscriptions_one_copy_max_qos_all_ids() -> None:
    shard = make_shard()
    sub = connect(shard, "sub")
    subscribe(sub, "a/#", qos=0, props={Prop.SUBSCRIPTION_IDENTIFIER: 7})
    subscribe(sub, "a/b", qos=1, pid=2, props={Prop.SUBSCRIPTION_IDENTIFIER: 9})
    pub = connect(shard, "pub")
    pub.send(Publish("a/b", b"x", qos=1, packet_id=1))
    got = publishes(sub.received())
    assert len(got) == 1
    assert got[0].qos == 1
    assert sorted(got[0].props[Prop.SUBSCRIPTION_IDENTIFIER]) == [7, 9]


def test_no_local() -> None:
    shard = make_shard()
    me = connect(shard, "me")
    subscribe(me, "chat", no_local=True)
    other = connect(shard, "other")
    me.send(Publish("chat", b"mine"))
    other.send(Publish("chat", b"theirs"))
    assert [p.payload for p in publishes(me.received())] == [b"theirs"]


def test_retained_delivery_handling_and_clear() -> None:
    shard = make_shard()
    pub = connect(shard, "pub")
    pub.send(Publish("r/1", b"keep", retain=True))
    sub = connect(shard, "sub")
    got = publishes(subscribe(sub, "r/#"))
    assert [(p.topic, p.payload, p.retain) for p in got] == [("r/1", b"keep", True)]
    # retain handling 1: only for a new subscription
    assert publishes(subscribe(sub, "r/#", pid=2, retain_handling=1)) == []
    # retain handling 2: never
    sub2 = connect(shard, "sub2")
    assert publishes(subscribe(sub2, "r/1", retain_handling=2)) == []
    # a live retained publish reaches existing subscribers with retain=0 unless RAP
    sub3 = connect(shard, "sub3")
    subscribe(sub3, "r/1", retain_handling=2, retain_as_published=True)
    pub.send(Publish("r/1", b"v2", retain=True))
    assert publishes(sub.received())[0].retain is False
    assert publishes(sub3.received())[0].retain is True
    pub.send(Publish("r/1", b"", retain=True))
    assert publishes(subscribe(connect(shard, "late"), "r/#")) == []


def test_retained_message_expiry() -> None:
    shard = make_shard()
    pub = connect(shard, "pub")
    pub.send(Publish("e/1", b"x", retain=True, props={Prop.MESSAGE_EXPIRY_INTERVAL: 5}), now=0.0)
    sub = connect(shard, "sub", now=2.0)
    sub.received()
    sub.send(Subscribe(1, [("e/#", SubOptions(0))]), now=2.0)
    got = publishes(sub.received())
    assert got[0].props[Prop.MESSAGE_EXPIRY_INTERVAL] == 3
    late = connect(shard, "late", now=6.0)
    late.received()
    assert shard.retained.match("e/#", 6.0) == []


def test_receive_maximum_limits_unacked_deliveries() -> None:
    shard = make_shard()
    sub = connect(shard, "sub", props={Prop.RECEIVE_MAXIMUM: 2})
    subscribe(sub, "q", qos=1)
    pub = connect(shard, "pub")
    for i in range(5):
        pub.send(Publish("q", str(i).encode(), qos=1, packet_id=i + 1))
    got = publishes(sub.received())
    assert [p.payload for p in got] == [b"0", b"1"]
    sub.send(Puback(got[0].packet_id))
    assert [p.payload for p in publishes(sub.received())] == [b"2"]


def test_inbound_receive_maximum_exceeded_disconnects() -> None:
    shard = make_shard(receive_maximum=2)
    pub = connect(shard, "pub")
    pub.received()
    pub.send(Publish("t", b"", qos=2, packet_id=1))
    pub.send(Publish("t", b"", qos=2, packet_id=2))
    pub.send(Publish("t", b"", qos=2, packet_id=3))
    out = pub.received()
    assert out[-1] == Disconnect(Reason.RECEIVE_MAXIMUM_EXCEEDED, out[-1].props)
    assert pub.closed


def test_persistent_session_queues_and_resends_with_dup() -> None:
    shard = make_shard()
    sub = connect(shard, "sub", clean_start=False, props={Prop.SESSION_EXPIRY_INTERVAL: 60})
    subscribe(sub, "q", qos=1)
    pub = connect(shard, "pub")
    pub.send(Publish("q", b"inflight", qos=1, packet_id=1))
    assert publishes(sub.received())[0].payload == b"inflight"
    sub.drop(now=1.0)
    pub.send(Publish("q", b"queued", qos=1, packet_id=2), now=2.0)
    back = connect(shard, "sub", clean_start=False, now=3.0, props={Prop.SESSION_EXPIRY_INTERVAL: 60})
    packets = back.received()
    assert packets[0].session_present is True
    got = publishes(packets)
    assert [(p.payload, p.dup) for p in got] == [(b"inflight", True), (b"queued", False)]


def test_v311_clean_session_false_keeps_subscriptions() -> None:
    shard = make_shard()
    sub = connect(shard, "sub3", version=MQTT_311, clean_start=False)
    subscribe(sub, "x", qos=1)
    sub.drop()
    pub = connect(shard, "pub", version=MQTT_311)
    pub.send(Publish("x", b"while away", qos=1, packet_id=1))
    back = connect(shard, "sub3", version=MQTT_311, clean_start=False)
    packets = back.received()
    assert packets[0].session_present
    assert publishes(packets)[0].payload == b"while away"


def test_session_expiry() -> None:
    shard = make_shard()
    sub = connect(shard, "s", clean_start=False, props={Prop.SESSION_EXPIRY_INTERVAL: 5})
    subscribe(sub, "x", qos=1)
    sub.drop(now=0.0)
    shard.tick(4.0)
    assert "s" in shard.sessions
    shard.tick(5.5)
    assert "s" not in shard.sessions and shard.trie.count == 0


def test_offline_queue_bound_and_qos0_policy() -> None:
    shard = make_shard(max_queued_messages=3, queue_qos0=False)
    sub = connect(shard, "s", clean_start=False, props={Prop.SESSION_EXPIRY_INTERVAL: 60})
    subscribe(sub, "x", qos=1)
    sub.drop()
    pub = connect(shard, "pub")
    pub.send(Publish("x", b"q0"))
    for i in range(5):
        pub.send(Publish("x", str(i).encode(), qos=1, packet_id=i + 1))
    back = connect(shard, "s", clean_start=False, props={Prop.SESSION_EXPIRY_INTERVAL: 60})
    assert [p.payload for p in publishes(back.received())] == [b"0", b"1", b"2"]
    assert shard.counters.dropped == 3


def test_will_on_abnormal_close_not_on_clean_disconnect() -> None:
    shard = make_shard()
    watcher = connect(shard, "w")
    subscribe(watcher, "will/#")
    a = connect(shard, "a", will=Will("will/a", b"gone"))
    a.drop()
    b = connect(shard, "b", will=Will("will/b", b"gone"))
    b.send(Disconnect())
    b.drop()
    c = connect(shard, "c", will=Will("will/c", b"gone"))
    c.send(Disconnect(Reason.DISCONNECT_WITH_WILL))
    c.drop()
    assert [p.topic for p in publishes(watcher.received())] == ["will/a", "will/c"]


def test_will_delay_and_cancel_on_reconnect() -> None:
    shard = make_shard()
    watcher = connect(shard, "w")
    subscribe(watcher, "will/#")
    props = {Prop.SESSION_EXPIRY_INTERVAL: 100}
    will = Will("will/d", b"late", props={Prop.WILL_DELAY_INTERVAL: 3})
    d = connect(shard, "d", clean_start=False, will=will, props=props)
    d.drop(now=0.0)
    shard.tick(2.0)
    assert publishes(watcher.received()) == []
    shard.tick(3.1)
    assert [p.topic for p in publishes(watcher.received())] == ["will/d"]
    e = connect(shard, "e", clean_start=False, props=props,
                will=Will("will/e", b"x", props={Prop.WILL_DELAY_INTERVAL: 3}))
    e.drop(now=10.0)
    connect(shard, "e", clean_start=False, props=props, now=11.0)
    shard.tick(20.0)
    assert publishes(watcher.received()) == []


def test_will_delay_longer_than_session_expiry_fires_at_expiry() -> None:
    shard = make_shard()
    watcher = connect(shard, "w")
    subscribe(watcher, "will/#")
    link = connect(shard, "f", props={Prop.SESSION_EXPIRY_INTERVAL: 2},
                   will=Will("will/f", b"x", props={Prop.WILL_DELAY_INTERVAL: 60}))
    link.drop(now=0.0)
    shard.tick(2.5)
    assert [p.topic for p in publishes(watcher.received())] == ["will/f"]


def test_takeover_sends_0x8e_and_resumes_session() -> None:
    shard = make_shard()
    props = {Prop.SESSION_EXPIRY_INTERVAL: 60}
    first = connect(shard, "dup", clean_start=False, props=props)
    subscribe(first, "t", qos=1)
    second = connect(shard, "dup", clean_start=False, props=props)
    assert first.received()[-1] == Disconnect(Reason.SESSION_TAKEN_OVER)
    assert first.closed
    assert connack(second).session_present
    first.drop()  # the old transport's close arrives late: ignored
    pub = connect(shard, "pub")
    pub.send(Publish("t", b"x", qos=1, packet_id=1))
    assert publishes(second.received())[0].payload == b"x"


def test_shared_subscription_round_robin_and_no_local_refused() -> None:
    shard = make_shard()
    m1, m2 = connect(shard, "m1"), connect(shard, "m2")
    subscribe(m1, "$share/g/s/#")
    subscribe(m2, "$share/g/s/#")
    normal = connect(shard, "n")
    subscribe(normal, "s/#")
    pub = connect(shard, "pub")
    for i in range(10):
        pub.send(Publish("s/x", str(i).encode()))
    a, b = publishes(m1.received()), publishes(m2.received())
    assert len(a) + len(b) == 10 and len(a) == 5
    assert len(publishes(normal.received())) == 10
    bad = connect(shard, "bad")
    bad.received()
    subscribe(bad, "$share/g/x", no_local=True)
    assert bad.error is not None and bad.error.reason == Reason.PROTOCOL_ERROR


def test_queue_prefix_is_one_shared_group() -> None:
    shard = make_shard()
    m1, m2 = connect(shard, "m1"), connect(shard, "m2")
    subscribe(m1, "$queue/jobs")
    subscribe(m2, "$queue/jobs")
    pub = connect(shard, "pub")
    for i in range(4):
        pub.send(Publish("jobs", b"j"))
    assert len(publishes(m1.received())) + len(publishes(m2.received())) == 4


def test_suback_codes_for_invalid_filters_and_limits() -> None:
    shard = make_shard(wildcard_subscription_available=False, max_subscriptions_per_client=2)
    link = connect(shard, "c")
    link.received()
    link.send(Subscribe(1, [("a/#/b", SubOptions()), ("a/+", SubOptions()), ("ok", SubOptions(1)),
                            ("ok2", SubOptions()), ("ok3", SubOptions())]))
    suback = link.received()[0]
    assert suback.reason_codes == [0x8F, 0xA2, 1, 0, 0x97]
    assert "'a/#/b'" in suback.props[Prop.REASON_STRING]
    link.send(Unsubscribe(2, ["ok", "never"]))
    assert link.received() == [Unsuback(2, [0, Reason.NO_SUBSCRIPTION_EXISTED])]


def test_topic_alias_outbound_and_max_packet_size() -> None:
    shard = make_shard()
    sub = connect(shard, "sub", props={Prop.TOPIC_ALIAS_MAXIMUM: 4, Prop.MAXIMUM_PACKET_SIZE: 64})
    subscribe(sub, "alias/topic")
    pub = connect(shard, "pub")
    pub.send(Publish("alias/topic", b"1"))
    pub.send(Publish("alias/topic", b"2"))
    pub.send(Publish("alias/topic", b"x" * 100))  # over the client's maximum: dropped
    pub.send(Publish("alias/topic", b"3"))
    got = publishes(sub.received())
    assert [p.payload for p in got] == [b"1", b"2", b"3"]
    assert got[0].topic == "alias/topic" and got[0].props[Prop.TOPIC_ALIAS] == 1
    assert got[1].topic == "" and got[1].props[Prop.TOPIC_ALIAS] == 1


def test_inbound_topic_alias() -> None:
    shard = make_shard(topic_alias_maximum=2)
    sub = connect(shard, "sub")
    subscribe(sub, "long/topic")
    pub = connect(shard, "pub")
    pub.send(Publish("long/topic", b"1", props={Prop.TOPIC_ALIAS: 1}))
    pub.send(Publish("", b"2", props={Prop.TOPIC_ALIAS: 1}))
    assert [(p.topic, p.payload) for p in publishes(sub.received())] == [("long/topic", b"1"),
                                                                         ("long/topic", b"2")]
    pub.received()
    pub.send(Publish("x", b"", props={Prop.TOPIC_ALIAS: 3}))
    assert pub.error is not None and pub.error.reason == Reason.TOPIC_ALIAS_INVALID


def test_message_expiry_drops_queued_and_counts_down() -> None:
    shard = make_shard()
    sub = connect(shard, "s", clean_start=False, props={Prop.SESSION_EXPIRY_INTERVAL: 60})
    subscribe(sub, "x", qos=1)
    sub.drop(now=0.0)
    pub = connect(shard, "pub")
    pub.send(Publish("x", b"short", qos=1, packet_id=1, props={Prop.MESSAGE_EXPIRY_INTERVAL: 1}), now=0.0)
    pub.send(Publish("x", b"long", qos=1, packet_id=2, props={Prop.MESSAGE_EXPIRY_INTERVAL: 10}), now=0.0)
    back = connect(shard, "s", clean_start=False, now=4.0, props={Prop.SESSION_EXPIRY_INTERVAL: 60})
    got = publishes(back.received())
    assert [p.payload for p in got] == [b"long"]
    assert got[0].props[Prop.MESSAGE_EXPIRY_INTERVAL] == 6


def test_payload_format_invalid() -> None:
    shard = make_shard()
    pub = connect(shard, "pub")
    pub.received()
    pub.send(Publish("t", b"\xff\xfe", qos=1, packet_id=1, props={Prop.PAYLOAD_FORMAT_INDICATOR: 1}))
    assert pub.received() == [Puback(1, Reason.PAYLOAD_FORMAT_INVALID)]


def test_sys_topics_published_on_tick() -> None:
    shard = make_shard(sys_interval=1.0)
    sub = connect(shard, "sys")
    subscribe(sub, "$SYS/broker/#")
    shard.tick(1.5)
    topics = {p.topic: p.payload for p in publishes(sub.received())}
    assert topics["$SYS/broker/clients/connected"] == b"1"
    assert "$SYS/broker/uptime" in topics and "$SYS/broker/messages/received" in topics


def test_clients_cannot_publish_to_sys() -> None:
    shard = make_shard()
    sub = connect(shard, "sys")
    subscribe(sub, "$SYS/#")
    pub = connect(shard, "pub")
    pub.received()
    pub.send(Publish("$SYS/broker/fake", b"x", qos=1, packet_id=1))
    assert pub.received() == [Puback(1, Reason.NOT_AUTHORIZED)]
    assert publishes(sub.received()) == []


def test_pingreq() -> None:
    shard = make_shard()
    link = connect(shard, "p")
    link.received()
    link.send(Pingreq())
    assert link.received() == [Pingresp()]


def test_disconnect_cannot_raise_expiry_from_zero() -> None:
    shard = make_shard()
    link = connect(shard, "z")
    link.received()
    link.send(Disconnect(props={Prop.SESSION_EXPIRY_INTERVAL: 10}))
    assert link.error is not None and link.error.reason == Reason.PROTOCOL_ERROR


def test_v311_connack_codes_for_refusals() -> None:
    shard = make_shard(allow_anonymous=False)
    link = connect(shard, "x", version=MQTT_311)
    assert connack(link).reason_code == Reason.NOT_AUTHORIZED  # encoded as v3 return code 5
    assert link.closed


def test_version_is_per_session_v5_props_not_sent_to_v311() -> None:
    shard = make_shard()
    old = connect(shard, "old", version=MQTT_311)
    subscribe(old, "p")
    pub = connect(shard, "pub", version=MQTT_5)
    pub.send(Publish("p", b"x", props={Prop.USER_PROPERTY: [("k", "v")]}))
    got = publishes(old.received())
    assert got[0].props == {}


def test_messages_routed_after_disconnect_before_transport_close_are_queued() -> None:
    """The session lets go of a link the moment the broker ends it: a message routed
    before the transport reports the close is queued, not written to a dead connection."""
    shard = make_shard()
    sub = connect(shard, "s", props={Prop.SESSION_EXPIRY_INTERVAL: 300})
    subscribe(sub, "g", qos=1)
    sub.send(Disconnect())  # no sub.drop(): connection_lost has not arrived yet
    pub = connect(shard, "p")
    for k in range(3):
        pub.send(Publish("g", b"q%d" % k, qos=1, packet_id=k + 1))
    again = connect(shard, "s", clean_start=False, props={Prop.SESSION_EXPIRY_INTERVAL: 0})
    assert [p.payload for p in publishes(again.received())] == [b"q0", b"q1", b"q2"]


class RecordingHost(LocalHost):
    def __init__(self) -> None:
        self.released_ids: list[str] = []

    def released(self, client_id: str) -> None:
        self.released_ids.append(client_id)


def test_local_takeover_does_not_release_the_id_it_just_claimed() -> None:
    host = RecordingHost()
    shard = Shard(MQTTConfig(), 0, 0.0, host)
    connect(shard, "x")  # expiry 0: the session ends with its connection
    connect(shard, "x")  # takes it over on the same shard
    assert host.released_ids == []
    link = connect(shard, "y")
    link.send(Disconnect())
    assert host.released_ids == ["y"]


def test_certificate_name_is_the_username_when_connect_has_none() -> None:
    # no user store yet: a username is refused as "bad credentials", none as "not authorized",
    # which tells whether the link's certificate name was used
    shard = make_shard(allow_anonymous=False)
    link = FakeLink(shard)
    link.peer_username = "alice"
    link.send(Connect("cert", protocol_level=MQTT_5))
    assert connack(link).reason_code == Reason.BAD_USER_NAME_OR_PASSWORD
    plain = connect(shard, "plain", version=MQTT_5)
    assert connack(plain).reason_code == Reason.NOT_AUTHORIZED
