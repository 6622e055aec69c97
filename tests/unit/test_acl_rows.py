"""ACL rules fetched per connection (the database ACL queries), sans-IO: the query is a
plain function here; the real databases are in tests/integration/test_auth_*.py."""

from __future__ import annotations

from typing import Any

from shards.acl import PUBLISH, SUBSCRIBE, Acl, Principal, rules_from_rows
from shards.config import AuthConfig, MQTTConfig
from shards.protocol.errors import Reason
from shards.protocol.packets import MQTT_5, Connack, Connect, Puback, Publish, Suback, SubOptions, Subscribe
from shards.security import Security, _acl_rows
from shards.shard import Shard
from tests.unit.shardkit import FakeLink
from tests.unit.test_security import Deferred

ROWS = [("allow", "publish", "devices/%c/#"), ("deny", "all", "users/%u/secret"),
        ("allow", "subscribe", "users/%u/#"), ("allow", "all", "eq rooms/#"),
        ("deny", "subscribe", "#")]


def test_rows_become_first_match_rules_with_placeholders_and_eq() -> None:
    rules, bad = rules_from_rows(ROWS + [("maybe", "publish", "x"), ("allow", "read", "x"),
                                         ("allow", "all", "")])
    assert len(rules) == 5 and len(bad) == 3
    acl = Acl(rules, no_match_allows=False)
    who = Principal("d1", "ann", None)
    assert acl.check(who, PUBLISH, "devices/d1/temp")
    assert not acl.check(who, PUBLISH, "devices/d2/temp")
    assert not acl.check(who, SUBSCRIBE, "users/ann/secret")  # the deny comes first
    assert acl.check(who, SUBSCRIBE, "users/ann/+")
    assert acl.check(who, SUBSCRIBE, "rooms/#") and not acl.check(who, SUBSCRIBE, "rooms/a")
    assert not acl.check(Principal("d1", None, None), SUBSCRIBE, "users/x/y")


def test_columns_by_name_or_position() -> None:
    assert _acl_rows([("publish", "allow", "t")], ["action", "permission", "topic"]) == \
        [("allow", "publish", "t")]
    assert _acl_rows([("allow", "publish", "t")], ["a", "b", "c"]) == [("allow", "publish", "t")]


def db_shard(rows: dict[str, list[tuple[str, str, str]]], io: Any, acl_no_match: str = "allow",
             fail: bool = False) -> tuple[Shard, list[tuple[str | None, str]]]:
    asked: list[tuple[str | None, str]] = []

    def query(username: str | None, client_id: str) -> list[tuple[str, str, str]]:
        asked.append((username, client_id))
        if fail:
            raise OSError("database down")
        return rows.get(client_id, [])

    sec = Security(AuthConfig(acl_no_match=acl_no_match), True, ".", io_offload=io)
    sec.acl_sources.append(("test", query))
    sec.set_acl(None)
    return Shard(MQTTConfig(), 0, 0.0, security=sec), asked


def test_rows_are_fetched_once_at_connect_on_the_io_port() -> None:
    io = Deferred()
    shard, asked = db_shard({"d1": ROWS}, io, acl_no_match="deny")
    link = FakeLink(shard)
    link.send(Connect("d1", protocol_level=MQTT_5, username="ann"))
    assert link.received() == [] and asked == []  # waiting on the I/O thread
    io.run()
    assert asked == [("ann", "d1")]
    assert isinstance(link.received()[0], Connack)
    for i in range(3):
        link.send(Publish("devices/d1/t", b"x", qos=1, packet_id=i + 1))
        link.send(Publish("devices/d2/t", b"x", qos=1, packet_id=i + 10))
    acks = link.received()
    assert [a.reason_code for a in acks if isinstance(a, Puback)] == \
        [Reason.NO_MATCHING_SUBSCRIBERS, Reason.NOT_AUTHORIZED] * 3
    link.send(Subscribe(1, [("elsewhere/#", SubOptions(0))]))
    (suback,) = link.received()
    assert isinstance(suback, Suback) and suback.reason_codes == [Reason.NOT_AUTHORIZED]
    assert asked == [("ann", "d1")] and io.pending == []  # no query per PUBLISH


def test_no_rows_or_a_failing_query_falls_through_to_no_match() -> None:
    for fail in (False, True):
        io = Deferred()
        shard, _ = db_shard({}, io, acl_no_match="deny", fail=fail)
        link = FakeLink(shard)
        link.send(Connect("d9", protocol_level=MQTT_5))
        io.run()
        assert link.received()[0].reason_code == 0  # type: ignore[attr-defined]
        link.send(Publish("a", b"x", qos=1, packet_id=1))
        assert link.received() == [Puback(1, Reason.NOT_AUTHORIZED)]


def test_client_gone_before_the_rows_arrive() -> None:
    io = Deferred()
    shard, _ = db_shard({"d1": ROWS}, io)
    link = FakeLink(shard)
    link.send(Connect("d1", protocol_level=MQTT_5))
    link.drop()
    link.conn.state = 3  # CLOSED, as the worker marks a lost connection
    io.run()
    assert "d1" not in shard.sessions
