"""Per-listener authentication: a listener's own chain and anonymous rule, sans-IO."""

from __future__ import annotations

import time

import jwt
import pytest

from shards.config import AuthConfig, Config, ConfigError, ListenersConfig, TcpListenerConfig
from shards.config import TlsListenerConfig
from shards.protocol.errors import Reason
from shards.protocol.packets import MQTT_5, Connect, Prop
from shards.security import AuthRequest, Security
from shards.shard import Shard
from shards.config import MQTTConfig
from shards.users import hash_password
from tests.unit.shardkit import FakeLink
from tests.unit.test_security import FAST

SECRET = "a-shared-secret-of-at-least-32-bytes!!"
BAD = Reason.BAD_USER_NAME_OR_PASSWORD


def listeners(tcp: dict[str, str], tls: dict[str, str]) -> ListenersConfig:
    return ListenersConfig(tcp=TcpListenerConfig(**tcp),
                           tls=TlsListenerConfig(**tls))  # (tls stays disabled: no socket here)


def security(tcp: dict[str, str], tls: dict[str, str], anon: bool = True) -> Security:
    sec = Security(AuthConfig(backends="builtin,jwt", jwt_secret=SECRET), anon, ".",
                   listeners=listeners(tcp, tls))
    assert sec.builtin is not None
    sec.builtin.set_users({"alice": hash_password("pw", **FAST)})
    return sec


def ask(sec: Security, listener: str | None, username: str | None, password: bytes | None) -> int:
    got: list[int | None] = []
    sec.authenticate(AuthRequest("c", username, password, None, listener),
                     lambda v, now: got.append(v), 0.0)
    assert got and got[0] is not None
    return got[0]


def token() -> bytes:
    return jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256").encode()


def test_a_listener_chain_limits_the_backends() -> None:
    sec = security({"auth": "builtin"}, {"auth": "jwt", "anonymous": "deny"})
    assert ask(sec, "tcp", "alice", b"pw") == 0
    assert ask(sec, "tcp", "dev", token()) == BAD  # jwt not asked on tcp
    assert ask(sec, "tls", "dev", token()) == 0
    assert ask(sec, "tls", "alice", b"pw") == BAD  # builtin not asked on tls
    assert ask(sec, "ws", "alice", b"pw") == 0 and ask(sec, "ws", "dev", token()) == 0  # global
    assert ask(sec, None, "dev", token()) == 0


def test_anonymous_per_listener() -> None:
    sec = security({"anonymous": "deny"}, {"anonymous": "allow"}, anon=True)
    assert ask(sec, "tcp", None, None) == Reason.NOT_AUTHORIZED
    assert ask(sec, "tls", None, None) == 0
    assert ask(sec, "ws", None, None) == 0  # inherits mqtt.allow_anonymous
    sec = security({}, {"anonymous": "allow"}, anon=False)
    assert ask(sec, "tcp", None, None) == Reason.NOT_AUTHORIZED
    assert ask(sec, "tls", None, None) == 0


def test_scram_is_offered_only_where_the_builtin_store_is_asked() -> None:
    sec = security({"auth": "builtin"}, {"auth": "jwt"})
    assert sec.scram_offered("tcp") and not sec.scram_offered("tls") and sec.scram_offered("ws")
    shard = Shard(MQTTConfig(), 0, 0.0, security=sec)
    link = FakeLink(shard)
    link.listener = "tls"  # type: ignore[attr-defined]
    link.send(Connect("c", protocol_level=MQTT_5, props={
        Prop.AUTHENTICATION_METHOD: "SCRAM-SHA-256", Prop.AUTHENTICATION_DATA: b"n,,n=alice,r=x"}))
    assert link.received()[0].reason_code == Reason.BAD_AUTHENTICATION_METHOD  # type: ignore[attr-defined]


def test_the_shard_passes_the_link_listener() -> None:
    sec = security({"anonymous": "deny"}, {})
    shard = Shard(MQTTConfig(), 0, 0.0, security=sec)
    for listener, code in (("tcp", Reason.NOT_AUTHORIZED), ("ws", 0)):
        link = FakeLink(shard)
        link.listener = listener  # type: ignore[attr-defined]
        link.send(Connect(f"c{listener}", protocol_level=MQTT_5))
        assert link.received()[0].reason_code == code  # type: ignore[attr-defined]


def test_config_refuses_a_listener_backend_outside_the_global_chain() -> None:
    with pytest.raises(ConfigError, match="listeners.tcp.auth"):
        Config(auth=AuthConfig(backends="builtin"),
               listeners=ListenersConfig(tcp=TcpListenerConfig(auth="jwt")))
    with pytest.raises(ConfigError, match="anonymous"):
        TcpListenerConfig(anonymous="maybe")
    cfg = Config(auth=AuthConfig(backends="builtin,jwt", jwt_secret="s"),
                 listeners=ListenersConfig(tcp=TcpListenerConfig(auth="jwt", anonymous="deny")))
    assert cfg.listeners.tcp.auth == "jwt"
