"""Per-listener authentication against a real broker: a TCP and a WebSocket listener with
different chains and anonymous rules, raw MQTT clients over real sockets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration import rawclient as raw
from tests.integration.test_auth import Auth
from tests.integration.transports import HOST, WSRaw
from tests.unit.test_jwt import SECRET, claims, hs

pytestmark = [pytest.mark.integration, pytest.mark.shoal_only]


def code(client: raw.RawClient, version: int, **connect: Any) -> int:
    client.send(raw.connect(version=version, **connect))
    return raw.parse_connack(client.expect(raw.CONNACK), version).code


def test_tcp_takes_passwords_ws_takes_tokens(make_broker: Any, tmp_path: Path, uid: str) -> None:
    a = Auth(tmp_path)
    a.add_user("alice", "wonderland")
    cfg = a.config(anonymous=True)
    cfg["auth"].update(backends="builtin,jwt", jwt_secret=SECRET)
    cfg["listeners"] = {"tcp": {"auth": "builtin", "anonymous": "deny"},
                        "ws": {"enabled": True, "bind": HOST, "port": 0, "auth": "jwt"}}
    b = make_broker(cfg)
    tcp, ws = b.ports["tcp"], b.ports["ws"]
    for v in (5, 4):
        with raw.RawClient(HOST, tcp) as c:
            assert code(c, v, client_id=f"{uid}a{v}", username="alice", password=b"wonderland") == 0
        with raw.RawClient(HOST, tcp) as c:  # a token is no password on tcp
            assert code(c, v, client_id=f"{uid}b{v}", username="dev", password=hs(claims())) != 0
        with raw.RawClient(HOST, tcp) as c:  # anonymous is denied on tcp only
            assert code(c, v, client_id=f"{uid}c{v}") == (0x87 if v == 5 else 5)
        with WSRaw(ws) as c:
            assert code(c, v, client_id=f"{uid}d{v}", username="dev", password=hs(claims())) == 0
        with WSRaw(ws) as c:  # and a password is no token on ws
            assert code(c, v, client_id=f"{uid}e{v}", username="alice",
                        password=b"wonderland") == (0x86 if v == 5 else 4)
        with WSRaw(ws) as c:  # ws inherits mqtt.allow_anonymous = true
            assert code(c, v, client_id=f"{uid}f{v}") == 0



def test_quic_listener_has_its_own_chain(make_broker: Any, tmp_path: Path, uid: str) -> None:
    """The QUIC listener authenticates like any other: its own chain and anonymous rule."""
    import asyncio

    from tests.integration.quicraw import RawQuic

    a = Auth(tmp_path)
    a.add_user("alice", "wonderland")
    cfg = a.config(anonymous=True)
    cfg["auth"].update(backends="builtin,jwt", jwt_secret=SECRET)
    cfg["listeners"] = {"quic": {"auth": "jwt", "anonymous": "deny"}}
    b = make_broker(cfg)

    async def connack(**connect: Any) -> int:
        q = await RawQuic.open(HOST, b.ports["quic"])
        try:
            control = await q.stream()
            control.send(raw.connect(version=5, **connect))
            return raw.parse_connack(await control.expect(raw.CONNACK), 5).code
        finally:
            await q.aclose()

    async def main() -> None:
        assert await connack(client_id=f"{uid}q1", username="dev", password=hs(claims())) == 0
        assert await connack(client_id=f"{uid}q2", username="alice",
                             password=b"wonderland") == 0x86  # a password is no token here
        assert await connack(client_id=f"{uid}q3") == 0x87  # anonymous denied on QUIC only
    asyncio.run(main())
    with raw.RawClient(HOST, b.ports["tcp"]) as c:  # tcp keeps the global chain
        assert code(c, 5, client_id=f"{uid}t", username="alice", password=b"wonderland") == 0
