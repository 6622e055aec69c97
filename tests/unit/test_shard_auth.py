"""A Shard with authentication, ACL, bans and flapping: packets in, packets out."""

from __future__ import annotations

from typing import Any

from shards.acl import Acl
from shards.config import AuthConfig, MQTTConfig
from shards.protocol.errors import Reason
from shards.protocol.packets import (
    MQTT_5, MQTT_311, Connack, Connect, Disconnect, Puback, Pubcomp, Publish, Pubrec, Pubrel,
    Suback, SubOptions, Subscribe, Will,
)
from shards.security import Security
from shards.shard import Shard
from shards.users import hash_password
from tests.unit.shardkit import FakeLink, publishes, subscribe
from tests.unit.test_security import FAST, Deferred


def secure_shard(acl: str | None = None, anon: bool = True, offload: Any = None,
                 **auth: Any) -> Shard:
    cfg = AuthConfig(backends="builtin", **auth)
    sec = Security(cfg, anon, ".", offload) if offload is not None else Security(cfg, anon)
    assert sec.builtin is not None
    sec.builtin.set_users({"alice": hash_password("secret", **FAST),
                           "bob": hash_password("hunter2", **FAST)})
    if acl is not None:
        sec.set_acl(Acl.from_text(acl, no_match_allows=auth.get("acl_no_match", "allow") == "allow"))
    return Shard(MQTTConfig(allow_anonymous=anon), 0, 0.0, security=sec)


def connect(shard: Shard, client_id: str, version: int = MQTT_5, peer: str = "127.0.0.1:40000",
            now: float = 0.0, **kw: Any) -> FakeLink:
    link = FakeLink(shard, now)
    link.peer = peer
    link.send(Connect(client_id, protocol_level=version, **kw), now)
    return link


def code(link: FakeLink) -> int:
    packets = link.received()
    assert isinstance(packets[0], Connack), packets
    return packets[0].reason_code


def test_good_and_bad_passwords_v5_and_v311() -> None:
    shard = secure_shard()
    assert code(connect(shard, "a", username="alice", password=b"secret")) == 0
    bad = connect(shard, "b", username="alice", password=b"nope")
    assert code(bad) == Reason.BAD_USER_NAME_OR_PASSWORD and bad.closed
    v3 = connect(shard, "c", version=MQTT_311, username="alice", password=b"nope")
    assert code(v3) == 0x86  # sent as v3 return code 4, decoded back to the v5 reason
    assert code(connect(shard, "d", username="nobody", password=b"x")) == 0x86
    assert "b" not in shard.sessions and "c" not in shard.sessions


def test_anonymous_off() -> None:
    shard = secure_shard(anon=False)
    assert code(connect(shard, "a")) == Reason.NOT_AUTHORIZED
    assert code(connect(shard, "b", version=MQTT_311)) == Reason.NOT_AUTHORIZED  # v3: 5
    assert code(connect(shard, "c", username="bob", password=b"hunter2")) == 0


def test_packets_behind_a_pending_connect_wait_for_the_answer() -> None:
    offload = Deferred()
    shard = secure_shard(offload=offload)
    link = FakeLink(shard)
    link.send(Connect("a", protocol_level=MQTT_5, username="alice", password=b"secret"))
    link.send(Subscribe(1, [("t", SubOptions(0))]))
    assert link.received() == [] and "a" not in shard.sessions
    offload.run(0.1)
    packets = link.received()
    assert isinstance(packets[0], Connack) and packets[0].reason_code == 0
    assert packets[1] == Suback(1, [0])


def test_client_gone_before_the_hash_is_done() -> None:
    offload = Deferred()
    shard = secure_shard(offload=offload)
    link = FakeLink(shard)
    link.send(Connect("a", protocol_level=MQTT_5, username="alice", password=b"secret"))
    link.conn.state = 3  # CLOSED: the transport went away
    link.drop()
    offload.run()
    assert "a" not in shard.sessions and shard.connected == 0


ACL = """
allow all all devices/%c/#
allow all publish users/%u/#
allow ip:10.0.0.0/8 all lan/#
deny all all #
"""


def test_denied_publish_v5_gets_0x87_and_is_not_routed() -> None:
    shard = secure_shard(ACL)
    sub = connect(shard, "s1", username="alice", password=b"secret")
    sub.received()
    assert subscribe(sub, "devices/s1/#")[0] == Suback(1, [0])
    pub = connect(shard, "p1", username="alice", password=b"secret")
    pub.received()
    pub.send(Publish("devices/s1/x", b"no", qos=1, packet_id=1))
    ack = pub.received()[0]
    assert isinstance(ack, Puback) and ack.reason_code == Reason.NOT_AUTHORIZED
    pub.send(Publish("devices/s1/x", b"no", qos=2, packet_id=2))
    ack2 = pub.received()[0]
    assert isinstance(ack2, Pubrec) and ack2.reason_code == Reason.NOT_AUTHORIZED
    pub.send(Publish("devices/s1/x", b"no", qos=0))
    assert pub.received() == []
    assert publishes(sub.received()) == []
    assert shard.security.publish_denied == 3
    # allowed: its own device tree and its user tree
    pub.send(Publish("devices/p1/x", b"ok", qos=1, packet_id=3))
    assert pub.received()[0].reason_code in (0, Reason.NO_MATCHING_SUBSCRIBERS)


def test_denied_publish_v311_is_acked_and_dropped() -> None:
    shard = secure_shard(ACL)
    pub = connect(shard, "p", version=MQTT_311, username="alice", password=b"secret")
    pub.received()
    pub.send(Publish("secret/x", b"no", qos=1, packet_id=1))
    assert pub.received() == [Puback(1)]
    pub.send(Publish("secret/x", b"no", qos=2, packet_id=2))
    assert pub.received() == [Pubrec(2)]
    pub.send(Pubrel(2))
    assert pub.received() == [Pubcomp(2)]  # the exchange completes normally
    assert not pub.closed


def test_disconnect_on_deny() -> None:
    shard = secure_shard(ACL, acl_deny_action="disconnect")
    pub = connect(shard, "p", username="alice", password=b"secret")
    pub.received()
    pub.send(Publish("secret/x", b"no", qos=1, packet_id=1))
    assert pub.error is not None and pub.error.reason == Reason.NOT_AUTHORIZED
    assert "p" not in shard.sessions


def test_denied_subscribe_gets_0x87_in_suback_v5_and_0x80_v311() -> None:
    shard = secure_shard(ACL)
    c5 = connect(shard, "c5", username="alice", password=b"secret")
    c5.received()
    c5.send(Subscribe(1, [("devices/c5/+", SubOptions(1)), ("other/#", SubOptions(1)),
                          ("$share/g/devices/c5/x", SubOptions(0))]))
    ack = c5.received()[0]
    assert isinstance(ack, Suback) and ack.reason_codes == [1, Reason.NOT_AUTHORIZED, 0]
    c3 = connect(shard, "c3", version=MQTT_311, username="alice", password=b"secret")
    c3.received()
    assert subscribe(c3, "other/#", qos=1)[0] == Suback(1, [0x80])
    assert shard.security.subscribe_denied == 2


def test_username_placeholder_and_cidr() -> None:
    shard = secure_shard(ACL)
    bob = connect(shard, "x", username="bob", password=b"hunter2", peer="10.2.3.4:1000")
    bob.received()
    bob.send(Publish("users/bob/a", b"", qos=1, packet_id=1))
    bob.send(Publish("users/alice/a", b"", qos=1, packet_id=2))
    bob.send(Publish("lan/a", b"", qos=1, packet_id=3))
    codes = [p.reason_code for p in bob.received()]
    assert codes == [Reason.NO_MATCHING_SUBSCRIBERS, Reason.NOT_AUTHORIZED,
                     Reason.NO_MATCHING_SUBSCRIBERS]
    wan = connect(shard, "y", username="bob", password=b"hunter2", peer="192.0.2.1:1000")
    wan.received()
    wan.send(Publish("lan/a", b"", qos=1, packet_id=1))
    assert wan.received()[0].reason_code == Reason.NOT_AUTHORIZED


def test_will_is_subject_to_the_acl() -> None:
    shard = secure_shard(ACL)
    sub = connect(shard, "s", peer="10.0.0.1:1")
    sub.received()
    subscribe(sub, "lan/#")
    subscribe(sub, "devices/#", pid=2)  # refused for s, but the point is the wills below
    ok = connect(shard, "w1", peer="10.0.0.2:1", will=Will("lan/will", b"bye"))
    denied = connect(shard, "w2", peer="192.0.2.2:1", will=Will("lan/will", b"sneaky"))
    ok.drop()
    denied.drop()
    assert [p.payload for p in publishes(sub.received())] == [b"bye"]


def test_banned_client_id_gets_0x8a() -> None:
    shard = secure_shard()
    shard.security.banned.load([{"kind": "clientid", "value": "bad", "until": None},
                                {"kind": "address", "value": "192.0.2.0/24", "until": None}],
                               0.0, 0.0)
    assert code(connect(shard, "bad")) == Reason.BANNED
    # v3 has no "banned": return code 5, not authorized (decoded back as 0x87)
    assert code(connect(shard, "bad", version=MQTT_311)) == Reason.NOT_AUTHORIZED
    assert code(connect(shard, "ok", peer="192.0.2.9:1")) == Reason.BANNED
    assert code(connect(shard, "ok")) == 0


def test_flapping_client_is_banned_for_the_window() -> None:
    shard = secure_shard(flapping_max_count=3, flapping_window=1.0, flapping_ban_time=2.0)
    t = 0.0
    for _ in range(3):
        link = connect(shard, "flap", now=t)
        assert code(link) == 0
        link.send(Disconnect(), t)
        t += 0.1
    assert code(connect(shard, "flap", now=t)) == Reason.BANNED
    assert code(connect(shard, "other", now=t)) == 0
    assert code(connect(shard, "flap", now=t + 2.0)) == 0


def test_no_acl_means_no_authorization_work() -> None:
    shard = secure_shard()
    assert shard.security.acl is None
    pub = connect(shard, "p")
    pub.received()
    pub.send(Publish("anything/at/all", b"", qos=1, packet_id=1))
    assert pub.received()[0].reason_code == Reason.NO_MATCHING_SUBSCRIBERS
    assert not shard.security._acl_cache
