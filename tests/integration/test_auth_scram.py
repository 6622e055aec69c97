"""MQTT 5 enhanced authentication with SCRAM-SHA-256 against a real broker, driven by a raw
MQTT 5 client over a real socket; the user is added with the `shoal user` CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shards.scram import ScramClient
from tests.integration.test_auth import Auth
from tests.integration.v5client import (
    AUTH, CONNACK, DISCONNECT, SUBACK, Packet, PacketTypes, RawClient, decode_props,
    encode_props, packet,
)

pytestmark = [pytest.mark.integration, pytest.mark.shoal_only]

METHOD = "SCRAM-SHA-256"


@pytest.fixture
def broker_with_users(make_broker: Any, tmp_path: Path) -> Any:
    a = Auth(tmp_path)
    a.add_user("alice", "wonderland")
    return make_broker(a.config(anonymous=False))


def auth_packet(code: int, data: bytes, method: str = METHOD) -> bytes:
    return packet(AUTH, 0, bytes([code]) + encode_props(
        PacketTypes.AUTH, {"AuthenticationMethod": method, "AuthenticationData": data}))


def read_auth(p: Packet | None) -> tuple[int, dict[str, Any]]:
    assert p is not None and p.type == AUTH, f"expected AUTH, got {p}"
    props, _ = decode_props(PacketTypes.AUTH, p.body[1:])
    return p.body[0], props


def begin(c: RawClient, client: ScramClient, client_id: str, method: str = METHOD) -> Packet | None:
    c.send(c.connect_packet(client_id, props_={"AuthenticationMethod": method,
                                               "AuthenticationData": client.first()}))
    return c.recv()


def test_right_password_connects_wrong_one_gets_0x86(broker_with_users: Any, uid: str) -> None:
    b = broker_with_users
    with RawClient(b) as c:
        client = ScramClient("alice", "wonderland", "clientnonce1")
        code, props = read_auth(begin(c, client, f"{uid}a"))
        assert code == 0x18 and props["AuthenticationMethod"] == METHOD
        c.send(auth_packet(0x18, client.final(props["AuthenticationData"])))
        ack = c.expect(CONNACK)
        assert ack.reason == 0 and ack.props["AuthenticationMethod"] == METHOD
        assert client.verify(ack.props["AuthenticationData"])  # the broker knows the verifier
        assert c.subscribe(1, [(f"{uid}/t", 0)]).type == SUBACK
        # re-authentication on the same connection
        again = ScramClient("alice", "wonderland", "clientnonce2")
        c.send(auth_packet(0x19, again.first()))
        code, props = read_auth(c.recv())
        assert code == 0x18
        c.send(auth_packet(0x18, again.final(props["AuthenticationData"])))
        code, props = read_auth(c.recv())
        assert code == 0x00 and again.verify(props["AuthenticationData"])
    for user, password in (("alice", "not-it"), ("nobody", "x")):
        with RawClient(b) as c:
            client = ScramClient(user, password, "n")
            code, props = read_auth(begin(c, client, f"{uid}b"))
            c.send(auth_packet(0x18, client.final(props["AuthenticationData"])))
            ack = c.expect(CONNACK)
            assert ack.reason == 0x86
            assert c.recv() is None  # and the broker closes


def test_unknown_method_gets_0x8c(broker_with_users: Any, uid: str) -> None:
    with RawClient(broker_with_users) as c:
        ack = begin(c, ScramClient("alice", "wonderland", "n"), f"{uid}a", method="SCRAM-SHA-1")
        assert ack is not None and ack.type == CONNACK and ack.reason == 0x8C


def test_auth_before_connect_or_with_the_wrong_method(broker_with_users: Any, uid: str) -> None:
    b = broker_with_users
    with RawClient(b) as c:
        c.send(auth_packet(0x19, b"n,,n=alice,r=x"))  # AUTH as the first packet
        assert c.recv() is None
    with RawClient(b) as c:
        client = ScramClient("alice", "wonderland", "n")
        code, props = read_auth(begin(c, client, f"{uid}m"))
        c.send(auth_packet(0x18, client.final(props["AuthenticationData"]), method="PLAIN"))
        ack = c.expect(CONNACK)
        assert ack.reason == 0x82  # protocol error
    with RawClient(b) as c:  # AUTH from a client that named no method: DISCONNECT 0x82
        c.send(packet(1, 0, b"\x00\x04MQTT\x05\xc2\x00\x3c\x00" + b"\x00\x05" + f"{uid}x"[:5].encode()
                      + b"\x00\x05alice\x00\x0awonderland"))
        assert c.expect(CONNACK).reason == 0
        c.send(auth_packet(0x19, b"n,,n=alice,r=x"))
        d = c.wait_disconnect()
        assert d is not None and d.type == DISCONNECT and d.reason == 0x82
