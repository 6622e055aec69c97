"""MQTT 5 enhanced authentication (SCRAM-SHA-256) through a Shard: packets in, packets out."""

from __future__ import annotations

from typing import Any

from shards.config import AuthConfig, MQTTConfig
from shards.protocol.connection import AUTHENTICATING, CLOSED
from shards.protocol.errors import Reason
from shards.protocol.packets import (
    MQTT_5, Auth, Connack, Connect, Disconnect, Prop, Publish, Suback, SubOptions, Subscribe,
)
from shards.scram import ScramClient, make_verifier
from shards.security import Security
from shards.shard import Shard
from tests.unit.shardkit import FakeLink

METHOD = {Prop.AUTHENTICATION_METHOD: "SCRAM-SHA-256"}


def scram_shard(backends: str = "builtin", anon: bool = False) -> Shard:
    sec = Security(AuthConfig(backends=backends), anon)
    if sec.builtin is not None:
        # few iterations keep the test fast; the count travels in the verifier
        sec.builtin.scram = {"alice": make_verifier("secret", iterations=64).encode()}
    return Shard(MQTTConfig(allow_anonymous=anon), 0, 0.0, security=sec)


def start(shard: Shard, client: ScramClient, client_id: str = "c", **kw: Any) -> FakeLink:
    link = FakeLink(shard)
    props = {**METHOD, Prop.AUTHENTICATION_DATA: client.first()}
    link.send(Connect(client_id, protocol_level=MQTT_5, props=props, **kw))
    return link


def answer(link: FakeLink, data: bytes, method: str = "SCRAM-SHA-256", code: int = 0x18) -> None:
    link.send(Auth(code, {Prop.AUTHENTICATION_METHOD: method, Prop.AUTHENTICATION_DATA: data}))


def challenge(link: FakeLink) -> bytes:
    (auth,) = link.received()
    assert isinstance(auth, Auth) and auth.reason_code == Reason.CONTINUE_AUTHENTICATION
    assert auth.props[Prop.AUTHENTICATION_METHOD] == "SCRAM-SHA-256"
    return auth.props[Prop.AUTHENTICATION_DATA]


def connack(link: FakeLink) -> Connack:
    packets = link.received()
    assert isinstance(packets[0], Connack), packets
    return packets[0]


def test_right_password_connects_and_the_server_proves_itself() -> None:
    shard = scram_shard()
    client = ScramClient("alice", "secret", "nonce1")
    link = start(shard, client)
    assert link.conn.state == AUTHENTICATING and "c" not in shard.sessions
    answer(link, client.final(challenge(link)))
    ack = connack(link)
    assert ack.reason_code == 0
    assert ack.props[Prop.AUTHENTICATION_METHOD] == "SCRAM-SHA-256"
    assert client.verify(ack.props[Prop.AUTHENTICATION_DATA])
    session = shard.sessions["c"]
    assert session.principal is not None and session.principal.username == "alice"
    link.send(Subscribe(1, [("t", SubOptions(0))]))
    assert link.received() == [Suback(1, [0])]


def test_wrong_password_and_unknown_user_get_0x86_at_the_end() -> None:
    shard = scram_shard()
    for client in (ScramClient("alice", "wrong", "n1"), ScramClient("mallory", "x", "n2")):
        link = start(shard, client)
        server_first = challenge(link)  # an unknown user gets a challenge too
        answer(link, client.final(server_first))
        assert connack(link).reason_code == Reason.BAD_USER_NAME_OR_PASSWORD
        assert link.closed and not shard.sessions


def test_unknown_user_gets_the_same_salt_twice() -> None:
    shard = scram_shard()
    firsts = [challenge(start(shard, ScramClient("mallory", "x", f"n{i}"))) for i in range(2)]
    assert [f.split(b",")[1:] for f in firsts][0] == [f.split(b",")[1:] for f in firsts][1]


def test_other_methods_or_no_user_store_get_0x8c() -> None:
    link = FakeLink(scram_shard())
    link.send(Connect("c", protocol_level=MQTT_5,
                      props={Prop.AUTHENTICATION_METHOD: "GS2-KRB5"}))
    assert connack(link).reason_code == Reason.BAD_AUTHENTICATION_METHOD
    link = start(scram_shard(backends="", anon=True), ScramClient("alice", "secret", "n"))
    assert connack(link).reason_code == Reason.BAD_AUTHENTICATION_METHOD


def test_malformed_client_first_and_mismatched_user_name_are_refused() -> None:
    shard = scram_shard()
    link = FakeLink(shard)
    link.send(Connect("c", protocol_level=MQTT_5,
                      props={**METHOD, Prop.AUTHENTICATION_DATA: b"garbage"}))
    assert connack(link).reason_code == Reason.BAD_USER_NAME_OR_PASSWORD
    link = start(shard, ScramClient("alice", "secret", "n"), username="bob")
    assert connack(link).reason_code == Reason.BAD_USER_NAME_OR_PASSWORD


def test_auth_with_another_method_or_code_is_a_protocol_error() -> None:
    shard = scram_shard()
    for method, code in (("PLAIN", 0x18), ("SCRAM-SHA-256", 0x19), ("SCRAM-SHA-256", 0x00)):
        client = ScramClient("alice", "secret", "n")
        link = start(shard, client)
        answer(link, client.final(challenge(link)), method, code)
        assert connack(link).reason_code == Reason.PROTOCOL_ERROR and link.conn.state == CLOSED


def test_other_packets_during_the_exchange_are_a_protocol_error() -> None:
    shard = scram_shard()
    client = ScramClient("alice", "secret", "n")
    link = start(shard, client)
    challenge(link)
    link.send(Publish("t", b"x"))
    assert connack(link).reason_code == Reason.PROTOCOL_ERROR and not shard.sessions


def test_disconnect_during_the_exchange_closes_quietly() -> None:
    shard = scram_shard()
    link = start(shard, ScramClient("alice", "secret", "n"))
    challenge(link)
    link.send(Disconnect())
    assert link.closed and link.received() == [] and not shard.sessions


def test_auth_without_a_method_after_connack_is_a_protocol_error() -> None:
    shard = scram_shard(backends="", anon=True)
    link = FakeLink(shard)
    link.send(Connect("plain", protocol_level=MQTT_5))
    assert connack(link).reason_code == 0
    link.send(Auth(Reason.RE_AUTHENTICATE, METHOD))
    (d,) = link.received()
    assert isinstance(d, Disconnect) and d.reason_code == Reason.PROTOCOL_ERROR


def connected(shard: Shard, client: ScramClient) -> FakeLink:
    link = start(shard, client)
    answer(link, client.final(challenge(link)))
    assert connack(link).reason_code == 0
    return link


def test_re_authentication_succeeds_while_packets_flow() -> None:
    shard = scram_shard()
    link = connected(shard, ScramClient("alice", "secret", "n"))
    again = ScramClient("alice", "secret", "n2")
    answer(link, again.first(), code=Reason.RE_AUTHENTICATE)
    server_first = challenge(link)
    link.send(Subscribe(1, [("t", SubOptions(0))]))  # not blocked by the exchange
    assert link.received() == [Suback(1, [0])]
    answer(link, again.final(server_first))
    (done,) = link.received()
    assert isinstance(done, Auth) and done.reason_code == Reason.SUCCESS
    assert again.verify(done.props[Prop.AUTHENTICATION_DATA])
    assert shard.sessions["c"].link is link


def test_failed_or_foreign_re_authentication_disconnects_0x87() -> None:
    shard = scram_shard()
    shard.security.builtin.scram["bob"] = make_verifier("pw", iterations=64).encode()  # type: ignore[union-attr]
    for again in (ScramClient("alice", "wrong", "n2"), ScramClient("bob", "pw", "n3")):
        link = connected(shard, ScramClient("alice", "secret", "n"))
        answer(link, again.first(), code=Reason.RE_AUTHENTICATE)
        packets = link.received()
        if packets and isinstance(packets[0], Auth):  # the wrong password fails at the end
            answer(link, again.final(packets[0].props[Prop.AUTHENTICATION_DATA]))
            packets = link.received()
        (d,) = packets
        assert isinstance(d, Disconnect) and d.reason_code == Reason.NOT_AUTHORIZED
        assert link.closed and shard.sessions.get("c") is None


def test_re_authentication_out_of_order_is_a_protocol_error() -> None:
    shard = scram_shard()
    link = connected(shard, ScramClient("alice", "secret", "n"))
    answer(link, b"c=biws,r=x,p=AAAA")  # 0x18 with no exchange under way
    (d,) = link.received()
    assert isinstance(d, Disconnect) and d.reason_code == Reason.PROTOCOL_ERROR
    link = connected(shard, ScramClient("alice", "secret", "n"))
    answer(link, ScramClient("alice", "secret", "m").first(), method="PLAIN",
           code=Reason.RE_AUTHENTICATE)
    (d,) = link.received()
    assert isinstance(d, Disconnect) and d.reason_code == Reason.PROTOCOL_ERROR


def test_an_exchange_left_hanging_times_out() -> None:
    shard = scram_shard()
    link = start(shard, ScramClient("alice", "secret", "n"))
    challenge(link)
    deadline = link.conn.connect_deadline
    assert link.conn.handle_timer(deadline - 0.1) is None
    assert link.conn.handle_timer(deadline) == Reason.MAXIMUM_CONNECT_TIME


def test_user_store_keeps_a_verifier_beside_the_hash(tmp_path: Any) -> None:
    from shards.users import add_user, delete_user, read_store
    path = tmp_path / "users.json"
    add_user(path, "alice", "secret", scram_iterations=64)
    users, scram = read_store(path)
    assert users["alice"].startswith("scrypt$")
    assert scram["alice"].startswith("SCRAM-SHA-256$64:")
    sec = Security(AuthConfig(backends="builtin", users_file=str(path)), False)
    sec.load(0.0, 0.0)
    shard = Shard(MQTTConfig(allow_anonymous=False), 0, 0.0, security=sec)
    connected(shard, ScramClient("alice", "secret", "n"))
    assert delete_user(path, "alice")
    assert read_store(path) == ({}, {})


def test_a_certificate_name_does_not_stand_in_the_way() -> None:
    # mTLS with peer_cert_as_username: the certificate's name fills an empty CONNECT user
    # name, but the user SCRAM proves is who the client is
    shard = scram_shard()
    client = ScramClient("alice", "secret", "n")
    link = FakeLink(shard)
    link.peer_username = "device-cert"
    link.send(Connect("c", protocol_level=MQTT_5,
                      props={**METHOD, Prop.AUTHENTICATION_DATA: client.first()}))
    answer(link, client.final(challenge(link)))
    assert connack(link).reason_code == 0
    principal = shard.sessions["c"].principal
    assert principal is not None and principal.username == "alice"
