"""SCRAM-SHA-256 under arbitrary input (hypothesis): whatever a client sends as client-first
or client-final, the server either goes on or raises its own ScramError, never anything
else; and the shard answers any AUTH data with a CONNACK, never an exception."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shards.protocol.errors import ProtocolError
from shards.protocol.packets import MQTT_5, Auth, Connack, Connect, Prop
from shards.scram import ScramClient, ScramError, ScramServer, make_verifier
from tests.unit.shardkit import FakeLink
from tests.unit.test_shard_scram import METHOD, scram_shard

VERIFIER = make_verifier("secret", iterations=16)
# bytes near the grammar find more paths than uniform noise
near = st.lists(st.sampled_from([b"n", b"y", b"p=x", b",", b"=", b"a=", b"n=", b"r=", b"c=",
                                 b"p=", b"s=", b"i=", b"biws", b"=2C", b"=3D", b"alice",
                                 b"\xff", b"AAAA", b"m="]), max_size=20).map(b"".join)
data = st.one_of(st.binary(max_size=200), near)


@settings(max_examples=300, deadline=None)
@given(first=data, final=data)
def test_server_raises_only_scram_error(first: bytes, final: bytes) -> None:
    s = ScramServer("srvnonce")
    try:
        s.client_first(first)
    except ScramError:
        return
    s.server_first(VERIFIER)
    try:
        s.client_final(final)
    except ScramError:
        pass


@settings(max_examples=200, deadline=None)
@given(final=data)
def test_any_client_final_after_a_good_first_is_refused(final: bytes) -> None:
    s = ScramServer("srvnonce")
    s.client_first(ScramClient("alice", "secret", "cn").first())
    s.server_first(VERIFIER)
    try:
        s.client_final(final)
    except ScramError:
        return
    raise AssertionError("random bytes passed as a proof")


@settings(max_examples=100, deadline=None)
@given(first=data, final=data)
def test_the_shard_answers_any_auth_data(first: bytes, final: bytes) -> None:
    shard = scram_shard()
    link = FakeLink(shard)
    link.send(Connect("c", protocol_level=MQTT_5, props={**METHOD, Prop.AUTHENTICATION_DATA: first}))
    out = link.received()
    if out and isinstance(out[0], Auth):
        link.send(Auth(0x18, {**METHOD, Prop.AUTHENTICATION_DATA: final}))
        out = link.received()
    assert len(out) == 1 and isinstance(out[0], Connack) and out[0].reason_code == 0x86
    assert link.error is None or isinstance(link.error, ProtocolError)
    assert not shard.sessions
